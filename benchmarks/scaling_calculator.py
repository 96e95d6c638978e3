"""Per-rank memory and communication of the class-sharded head, against PartialFC; and a small
measured CPU run of it over gloo. Prints Markdown (docs/scaling.md holds its output).

    python benchmarks/scaling_calculator.py tables [--dim 512] [--act-bytes 2] [--chunk 8192]
    python benchmarks/scaling_calculator.py measure [--batch 512] [--classes 20000] [--dim 128] [--worlds 1 2 4]

The model of `tables` (bytes, per rank; W ranks, C classes, B the global batch, D the
embedding size, a the bytes of an activation element, C_r = ceil(C / W) the largest shard):
- prototype state: the float32 shard C_r·D·4, its gradient C_r·D·4, the optimiser state (SGD
  momentum C_r·D·4, AdamW 2·C_r·D·4), and with a < 4 the low-precision copy of the shard that
  autocast makes for the step, C_r·D·a (PartialFC's F.linear under autocast makes it too).
- head workspace, ours (ree_kernels.distributed on a kernel backend): the gathered embeddings
  B·D·a (kept for the backward), their gradient before the reduce-scatter B·D·a, one cosine
  tile B·min(chunk, C_r)·4 of the streaming kernel, and 16 per-row 8-byte values.
- head workspace, PartialFC (insightface arcface_torch partial_fc_v2, sample_rate 1): the
  gathered embeddings in float32 B·D·4 and the B × C_r logits counted once in float32, B·C_r·4:
  a lower bound, since its code keeps the input saved by clamp and the in-place softmax alive
  together.
- communication: bytes each rank sends per step with ring collectives (all-gather and
  reduce-scatter of n bytes: (W−1)/W·n; all-reduce: 2(W−1)/W·n). Ours: the embeddings all-gather
  B·D·a, labels B·8, metadata 12·8 per rank, the combine's all-reduces (max 2·B·8, sum 2·B·8,
  min B·8), the embedding-gradient reduce-scatter B·D·a. PartialFC: the embedding all-gather in
  float32 B·D·4, labels B·8, its three [B] float32 all-reduces, the gradient reduce B·D·4.
The backbone's own DDP all-reduce is the same for both and is left out.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Sequence, Tuple

GIB = 2 ** 30
MIB = 2 ** 20
CLASSES = (100_000, 1_000_000, 2_000_000, 10_000_000)
BATCHES = (512, 1024, 2048, 4096, 8192)
WORLDS = (1, 2, 4, 8, 16, 32, 64)
OPTIMIZER_STATES = {"sgd": 1, "adamw": 2}


def shard_rows(classes: int, world: int) -> int:
    return -(-classes // world)


def prototype_state_bytes(classes: int, world: int, dim: int, act: int, optimizer: str) -> int:
    """The float32 shard, its gradient, the optimiser state and the autocast copy."""
    rows = shard_rows(classes, world)
    return rows * dim * 4 * (2 + OPTIMIZER_STATES[optimizer]) + (rows * dim * act if act < 4 else 0)


def ours_workspace_bytes(classes: int, batch: int, world: int, dim: int, act: int, chunk: int) -> int:
    return 2 * batch * dim * act + batch * min(chunk, shard_rows(classes, world)) * 4 + 16 * batch * 8


def partialfc_workspace_bytes(classes: int, batch: int, world: int, dim: int) -> int:
    return batch * dim * 4 + batch * shard_rows(classes, world) * 4


def ring(world: int) -> float:
    return (world - 1) / world


def ours_sent_bytes(batch: int, world: int, dim: int, act: int) -> float:
    gathers = batch * dim * act + batch * 8 + 12 * 8 * world
    all_reduces = (2 + 2 + 1) * batch * 8
    return ring(world) * (gathers + 2 * all_reduces + batch * dim * act)


def partialfc_sent_bytes(batch: int, world: int, dim: int) -> float:
    return ring(world) * (batch * dim * 4 + batch * 8 + 2 * 3 * batch * 4 + batch * dim * 4)


def human(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n:.0f} B"


def table(title: str, rows: Sequence[str], columns: Sequence[str], cell: Callable[[str, str], str]) -> str:
    lines = [f"**{title}**", "", "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + r + " | " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def tables(args: argparse.Namespace) -> str:
    d, a, chunk = args.dim, args.act_bytes, args.chunk
    ranks = [f"{w} rank{'s' * (w > 1)}" for w in WORLDS]
    world_of = dict(zip(ranks, WORLDS))
    class_rows = [f"C = {c:,}" for c in CLASSES]
    classes_of = dict(zip(class_rows, CLASSES))
    batch_rows = [f"B = {b}" for b in BATCHES]
    batch_of = dict(zip(batch_rows, BATCHES))
    out = [f"D = {d}, activations {a} bytes/element, streaming tile {chunk} classes.\n"]
    for optimizer in OPTIMIZER_STATES:
        out.append(table(
            f"Prototype state per rank: float32 shard + gradient + {optimizer} state"
            + (f" + {a}-byte autocast copy" if a < 4 else ""),
            class_rows, ranks,
            lambda r, c, optimizer=optimizer: human(
                prototype_state_bytes(classes_of[r], world_of[c], d, a, optimizer))))
    for classes in CLASSES:
        out.append(table(
            f"Head workspace per rank, C = {classes:,}: ours / PartialFC (B x C/W float32 logits, a lower bound)",
            batch_rows, ranks,
            lambda r, c, classes=classes: (
                f"{human(ours_workspace_bytes(classes, batch_of[r], world_of[c], d, a, chunk))} / "
                f"{human(partialfc_workspace_bytes(classes, batch_of[r], world_of[c], d))}")))
    out.append(table(
        "Bytes sent per rank per step (any C): ours / PartialFC", batch_rows, ranks,
        lambda r, c: (f"{human(ours_sent_bytes(batch_of[r], world_of[c], d, a))} / "
                      f"{human(partialfc_sent_bytes(batch_of[r], world_of[c], d))}")))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Measured: the sharded head over gloo on this machine's CPUs
# --------------------------------------------------------------------------------------------

def _measure_rank(rank: int, world: int, store: str, args: argparse.Namespace, results: Dict) -> None:
    import torch
    import torch.distributed as dist

    from ree_kernels import arcface_head
    from ree_kernels.backends import resolve_backend
    from ree_kernels.distributed import shard_range, sharded_arcface_head

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    g = torch.Generator().manual_seed(0)
    emb_all = torch.randn(args.batch, args.dim, generator=g)
    labels_all = torch.randint(0, args.classes, (args.batch,), generator=g)
    protos = torch.randn(args.classes, args.dim, generator=g)
    rows = slice(*shard_range(args.batch, rank, world))
    start, stop = shard_range(args.classes, rank, world)
    emb = emb_all[rows].clone().requires_grad_(True)
    shard = protos[start:stop].clone().requires_grad_(True)
    def step_time(head: Callable) -> Tuple[float, float]:
        """Median wall time and CPU time of a step, each the maximum over the ranks."""
        walls, cpus = [], []
        for step in range(args.warmup + args.steps):
            dist.barrier()
            tick, cpu = time.perf_counter(), time.process_time()
            head().loss.backward()
            spent = torch.tensor([time.perf_counter() - tick, time.process_time() - cpu], dtype=torch.float64)
            dist.all_reduce(spent, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
            if step >= args.warmup:
                walls.append(float(spent[0]))
                cpus.append(float(spent[1]))
            emb.grad = shard.grad = None
        return statistics.median(walls), statistics.median(cpus)

    backend = resolve_backend(args.backend, "head", emb.device, emb.dtype)
    sharded = step_time(lambda: sharded_arcface_head(emb, shard, labels_all[rows], num_classes=args.classes,
                                                     backend=args.backend))
    if rank == 0:
        results[f"{world} rank{'s' * (world > 1)}"] = (*sharded, f"sharded_arcface_head, {backend}")
    if world == 1:  # the op it wraps, without torch.distributed
        results["arcface_head"] = (*step_time(lambda: arcface_head(emb, shard, labels_all, backend=args.backend)),
                                   f"arcface_head, {backend}")
    dist.barrier()
    dist.destroy_process_group()


def measure(args: argparse.Namespace) -> str:
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_measure_rank, args=(world, f"{tmp}/store", args, results), nprocs=world,
                               start_method="spawn")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [f"B = {args.batch} (global), C = {args.classes:,}, D = {args.dim}, float32, forward + backward, "
             f"median of {args.steps} steps after {args.warmup} warm-up; {os.cpu_count()} CPU cores, "
             f"load average {load}; torch threads per rank: {args.threads or 'cores // ranks'}.", "",
             "| run | op, backend | wall time per step | CPU time per rank and step |", "|---|---|---|---|"]
    for run, (wall, cpu, op) in results.items():
        lines.append(f"| {run} | {op} | {wall * 1000:.0f} ms | {cpu * 1000:.0f} ms |")
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    calc = sub.add_parser("tables", help="the calculated memory and communication tables")
    calc.add_argument("--dim", type=int, default=512)
    calc.add_argument("--act-bytes", type=int, default=2, choices=(2, 4), help="2: bf16/fp16 autocast, 4: float32")
    calc.add_argument("--chunk", type=int, default=8192, help="classes per streaming tile of the kernel")
    run = sub.add_parser("measure", help="time the sharded head over gloo on this machine")
    run.add_argument("--batch", type=int, default=512)
    run.add_argument("--classes", type=int, default=20000)
    run.add_argument("--dim", type=int, default=128)
    run.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    run.add_argument("--steps", type=int, default=5)
    run.add_argument("--warmup", type=int, default=1)
    run.add_argument("--backend", default="auto")
    run.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores // ranks)")
    args = parser.parse_args(argv)
    if args.command == "tables":
        print(tables(args))
    else:
        print(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
