"""Compiles every Triton kernel of ree_kernels/triton/ for sm_80 and sm_90 on a machine without
a GPU, through the real launchers, and fails on what a GPU would refuse or run badly.

How: Triton's front end, LLVM and its bundled ptxas all run on the CPU; only the driver (current
device, stream, target) needs a GPU. `offline_target` installs a stand-in driver answering
device 0, stream 0 and `GPUTarget("cuda", arch, 32)`, turns every launch into a compile-only
warm-up (`JITFunction.run(..., warmup=True)`), and makes an autotuned launch compile every
candidate instead of timing them. The launchers (`head.forward_rows`, `head.backward_grads`,
`aux_loss.aux_losses`) then run unchanged on meta tensors (no memory; a meta tensor's address is
0, so pointers specialise as 16-byte aligned, as CUDA allocations are), with the class splits
sized for the card's multiprocessor count. So the kernels compiled are exactly those (constexprs,
num_warps, num_stages, argument specialisation) a launch of that shape would compile on the card.

A compile fails the check on any error (front end, LLVM, ptxas, ptxas past `--ptxas-timeout`),
on shared memory above the card's per-block limit, and on any register spill (ptxas -v). Results:
a CSV and a markdown table (kernel, case, configuration, registers, spills, shared memory,
compile seconds) named after the Triton version and the targets.

    python benchmarks/gpu_verify_triton.py                      # the full sweep (make gpu-verify-triton)
    python benchmarks/gpu_verify_triton.py --quick --out build  # CI: one shape, sm_90, bf16

What it cannot prove: speed, occupancy, or that the GPU's numbers equal the interpreter's
(docs/design.md, "Compiled for sm_80/sm_90 without a GPU").
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

CARDS = {
    # arch: (card, multiprocessors, shared memory per block in bytes, the opt-in maximum)
    80: ("A100", 108, 166_912),
    90: ("H100", 132, 232_448),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_CONFIG_KEYS = ("BLOCK_B", "BLOCK_C", "BLOCK_K", "BLOCK_DO", "BLOCK_R", "BLOCK_D", "BLOCK")


@dataclass
class Compiled:
    """One compile: what was compiled, and what ptxas and Triton said about it."""
    kernel: str
    arch: int
    case: str
    config: str
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared: Optional[int] = None
    seconds: float = 0.0
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class StandInDriver:
    """What `JITFunction.run` asks of Triton's driver, answered without a GPU: device 0, stream 0,
    and the target to compile for. Anything else (loading, launching) is never reached."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")


class _PtxasWithTimeout:
    """The `subprocess` module as Triton's NVIDIA compiler sees it, with a timeout on ptxas."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, *args, **kwargs):
        return subprocess.run(*args, timeout=self.seconds, **kwargs)


def _config_text(constexprs: Dict, options) -> str:
    parts = [f"{k}={v}" for k, v in constexprs.items() if k in _CONFIG_KEYS]
    parts += [f"warps={options.num_warps}", f"stages={options.num_stages}"]
    return " ".join(parts)


@contextlib.contextmanager
def offline_target(arch: int, case: List[str], records: List[Compiled], ptxas_timeout: float) -> Iterator[None]:
    """Within: every Triton launch compiles for sm_`arch` (no launch), autotuned launches compile
    every candidate, class splits are sized for the card, and each compile is appended to
    `records` under the case named by case[0] (the caller updates it)."""
    import triton.backends.nvidia.compiler as nvidia_compiler
    from triton import knobs

    from ree_kernels.triton import tiling

    _, sms, smem_limit = CARDS[arch]
    saved = (JITFunction.run, JITFunction._do_compile, Autotuner.run, tiling.multiprocessors,
             nvidia_compiler.subprocess, knobs.nvidia.dump_ptxas_log, knobs.cache.dir, driver._active)
    original_run, original_compile = JITFunction.run, JITFunction._do_compile
    fusion_unset = [False]

    def run(self, *args, grid, warmup, **kwargs):
        # Triton 3.10 changes the default of enable_fp_fusion: a launch must not rely on it.
        fusion_unset[0] = "enable_fp_fusion" not in kwargs
        return original_run(self, *args, grid=grid, warmup=True, **kwargs)

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        names = {path[0]: value for path, value in constexprs.items() if len(path) == 1}
        params = [p.name for p in self.params]
        record = Compiled(kernel=self.fn.__name__, arch=arch, case=case[0],
                          config=_config_text({params[i]: v for i, v in names.items()}, options))
        if fusion_unset[0]:
            record.problems.append("launched without enable_fp_fusion")
        log = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):  # knobs.nvidia.dump_ptxas_log prints ptxas -v here
                kernel = original_compile(self, key, signature, device, constexprs, options, attrs, warmup)
        except subprocess.TimeoutExpired:
            record.problems.append(f"ptxas ran past {ptxas_timeout:.0f} s")
            kernel = None
        except Exception as err:  # noqa: BLE001 - every compile error is a finding, recorded and reported
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            ptxas_error = re.search(r"ptxas[^\n]*(error|fatal)[^\n]*", str(err))
            record.problems.append(f"{type(err).__name__}: {ptxas_error.group(0) if ptxas_error else first}"[:300])
            kernel = None
        record.seconds = time.perf_counter() - start
        if kernel is not None:
            text = log.getvalue()
            registers, spills = _REGISTERS.findall(text), _SPILLS.findall(text)
            record.registers = max(int(r) for r in registers) if registers else None
            record.spill_bytes = sum(int(st) + int(ld) for st, ld in spills) if spills else None
            record.shared = kernel.metadata.shared
            if record.registers is None or record.spill_bytes is None:
                record.problems.append("no ptxas -v report (a cached compile?)")
            elif record.spill_bytes:
                record.problems.append(f"spills {record.spill_bytes} B")
            if record.shared > smem_limit:
                record.problems.append(f"shared memory {record.shared} B > {smem_limit} B")
        records.append(record)
        print(f"{record.kernel} sm_{arch} [{record.case}] {record.config}: {record.registers} registers, "
              f"{record.spill_bytes} B spilled, {record.shared} B shared, {record.seconds:.1f} s "
              f"{'; '.join(record.problems) or 'ok'}", file=sys.stderr, flush=True)
        return kernel

    def autotuned_run(self, *args, **kwargs):
        # What the autotuner would time on the card: every candidate, compiled here.
        for config in self.configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    JITFunction.run, JITFunction._do_compile, Autotuner.run = run, do_compile, autotuned_run
    tiling.multiprocessors = lambda device: sms
    nvidia_compiler.subprocess = _PtxasWithTimeout(ptxas_timeout)
    knobs.nvidia.dump_ptxas_log = True
    driver.set_active(StandInDriver(arch))
    try:
        with tempfile.TemporaryDirectory(prefix="ree-triton-cache-") as cache:
            knobs.cache.dir = cache  # a fresh cache: every kernel really compiles and reports
            yield
    finally:
        (JITFunction.run, JITFunction._do_compile, Autotuner.run, tiling.multiprocessors,
         nvidia_compiler.subprocess, knobs.nvidia.dump_ptxas_log, knobs.cache.dir, driver._active) = saved


@dataclass
class Sweep:
    """Which launches to compile. The per-row kernels take the margin and RI forms as constexprs:
    with `all_forms`, chunk_size 0 goes through every margin mode (paired with an RI form, with
    and without a UI centre); the tiled kernels do not depend on them."""
    archs: Sequence[int] = (80, 90)
    dtypes: Sequence[str] = ("bf16", "fp16", "fp32")
    shapes: Sequence[Tuple[int, int, int]] = ((1024, 100_000, 512),)
    chunk_sizes: Sequence[int] = ()  # () = 0 (autotuned) and both ends of the accepted range
    filter_eps: Sequence[float] = (0.0, 1e-6)  # the gradient filter off and on
    all_forms: bool = True
    aux: bool = True


def _launch_everything(sweep: Sweep, case: List[str]) -> None:
    from ree_kernels import contract
    from ree_kernels.triton import aux_loss, head, tiling

    meta = torch.device("meta")
    chunk_sizes = sweep.chunk_sizes or (0, tiling.MIN_TILE, tiling.MAX_TILE)
    forms = list(zip(contract.MARGIN_MODES, contract.RI_FORMS))
    for batch, classes, dim in sweep.shapes:
        for name in sweep.dtypes:
            dtype = DTYPES[name]
            e = torch.empty(batch, dim, dtype=dtype, device=meta)
            w = torch.empty(classes, dim, dtype=dtype, device=meta)
            labels = torch.empty(batch, dtype=torch.int64, device=meta)
            rows = torch.empty(batch, dtype=torch.float32, device=meta)
            for chunk in chunk_sizes:
                for k, (mode, form) in enumerate(forms if chunk == 0 and sweep.all_forms else forms[:1]):
                    ui = torch.empty(dim, device=meta) if k % 2 == 0 else None
                    shape = f"B={batch} C={classes} D={dim} {name} chunk={chunk} {mode}"
                    case[0] = f"{shape}; {form}{' ui' if ui is not None else ''}"
                    head.forward_rows(e, w, labels, 64.0, 0.5, mode, -100, chunk, ui_center=ui, ri_form=form)
                    for eps in sweep.filter_eps:
                        case[0] = f"{shape}; filter={eps:g}"
                        head.backward_grads(e, w, labels, rows, rows, 64.0, 0.5, mode, chunk, eps)
            # PartialFC sampling: the prototypes read through a class index (a tenth of them).
            index = torch.empty(max(classes // 10, 1), dtype=torch.int64, device=meta)
            case[0] = f"B={batch} C={classes} D={dim} {name} class_index[{index.shape[0]}]"
            head.forward_rows(e, w, labels, 64.0, 0.5, "arcface", -100, 0, class_index=index)
            head.backward_grads(e, w, labels, rows, rows, 64.0, 0.5, "arcface", 0, class_index=index)
        if sweep.aux:
            pred = torch.empty(batch, dtype=torch.float32, device=meta)
            keep = torch.empty(batch, dtype=torch.bool, device=meta)
            for name in sweep.dtypes:
                v = torch.empty(batch, dim, dtype=DTYPES[name], device=meta)
                case[0] = f"B={batch} D={dim} aux {name}"
                aux_loss.aux_losses(pred, pred, pred[:1], v, v, v[0], keep, 0.1, 1.0)
            case[0] = f"B={batch} aux without attn"
            aux_loss.aux_losses(pred, pred, pred[:1], None, None, None, None, 0.1, 1.0)


def verify(sweep: Sweep, ptxas_timeout: float = 300.0) -> List[Compiled]:
    """Compiles `sweep` for each target; returns every compile (failed ones included)."""
    from ree_kernels.backends import TRITON_INTERPRET

    if TRITON_INTERPRET:
        raise RuntimeError("gpu_verify_triton compiles for the GPU: unset TRITON_INTERPRET")
    records: List[Compiled] = []
    case = [""]
    for arch in sweep.archs:
        with offline_target(arch, case, records, ptxas_timeout):
            _launch_everything(sweep, case)
    return records


def write_tables(records: Sequence[Compiled], out: Path, stem: str, title: str) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    columns = ["kernel", "target", "case", "configuration", "registers", "spill bytes", "shared bytes",
               "compile s", "problems"]
    rows = [[r.kernel, f"sm_{r.arch}", r.case, r.config, r.registers, r.spill_bytes, r.shared, f"{r.seconds:.1f}",
             "; ".join(r.problems) or "ok"] for r in records]
    csv_path, md_path = out / f"{stem}.csv", out / f"{stem}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    failed = sum(not r.ok for r in records)
    lines = [f"# {title}", "",
             f"{len(records)} compiles, {failed} failing, {sum(r.seconds for r in records):.0f} s of compilation "
             f"(benchmarks/gpu_verify_triton.py; chunk=0 is the autotuned candidate set, whose every "
             f"candidate is compiled, as the autotuner does at a shape's first call).", "",
             "First call of a shape (forward and backward, no filter; the first case of a dtype compiles "
             "everything, later ones only what is new):", "",
             "| target | case | compiles | compile s |", "|---|---|---|---|"]
    first_calls: Dict[tuple, List[Compiled]] = {}
    for r in records:
        if "; filter=" in r.case and not r.case.endswith("; filter=0"):
            continue  # the gradient filter's kernels: not compiled by a call without it
        first_calls.setdefault((r.arch, r.case.split("; ")[0]), []).append(r)
    lines += [f"| sm_{arch} | {group} | {len(rs)} | {sum(r.seconds for r in rs):.1f} |"
              for (arch, group), rs in first_calls.items()]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI: what the first bf16 call of B=1024 C=100000 D=512 compiles on an H100 "
                             "(sm_90, chunk_size 0, every autotune candidate, no filter, one margin mode) "
                             "and the aux kernels")
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(CARDS))
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--ptxas-timeout", type=float, default=300.0, help="seconds per ptxas run (a failure)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--stem", default=None, help="file name stem (default: gpu-verify-triton-<version>)")
    args = parser.parse_args(argv)

    sweep = Sweep()
    if args.quick:
        sweep = Sweep(archs=(90,), dtypes=("bf16",), chunk_sizes=(0,), filter_eps=(0.0,), all_forms=False)
    if args.arch:
        sweep.archs = tuple(args.arch)
    if args.dtype:
        sweep.dtypes = tuple(args.dtype)
    start = time.perf_counter()
    records = verify(sweep, args.ptxas_timeout)
    targets = "+".join(f"sm{a}" for a in sweep.archs)
    stem = args.stem or f"gpu-verify-triton-{triton.__version__}-{targets}{'-quick' if args.quick else ''}"
    title = (f"Triton {triton.__version__} kernels compiled for {', '.join(f'sm_{a}' for a in sweep.archs)} "
             f"without a GPU (torch {torch.__version__}, {os.cpu_count()} CPUs)")
    paths = write_tables(records, args.out, stem, title)
    failed = [r for r in records if not r.ok]
    for r in failed:
        print(f"FAIL {r.kernel} sm_{r.arch} [{r.case}] {r.config}: {'; '.join(r.problems)}")
    print(f"{len(records)} compiles, {len(failed)} failing, {time.perf_counter() - start:.0f} s; "
          f"tables: {', '.join(str(p) for p in paths)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
