"""PartialFC sampling on the CPU: one step (forward + backward) of the head over all C classes
against the same step over a sampled ⌈r·C⌉ (ree_kernels.sample_classes, read through the index),
with the floors (the three plain matrix products) of both sizes, in one run so that their ratios
hold on a loaded machine.

    PYTHONPATH=.:python python benchmarks/sampled_head.py --out benchmarks/results/sampled_head_cpu.json

Cases (median of --repeats rounds after a warm-up round, each round taking every case in turn; seconds):
- full:        arcface_head(backend="cpu") over all C prototypes, loss.backward() into a [C, D] .grad
- sampled:     the draw (sample_classes) + arcface_head(class_index=...) + backward: the kernel reads
               the C' rows through the index; the gradient is scattered into the [C, D] .grad
- draw:        sample_classes alone (a C-long uniform draw and a top-k)
- sampled-op:  the op alone on a fixed draw (torch.ops.ree.head_forward_with_grad with the index): the
               kernel's cost, its gradient [C', D], without the [C, D] .grad the parameter needs
- grad-scatter: the [C, D] .grad from the op's [C', D] gradient alone (zeros + index_copy_), which
               a dense parameter needs whatever computes the gradient
- gathered:    arcface_head over prototypes[index] (a C' × D copy) + backward, the copy the index avoids
- floor-full, floor-sampled: E·Wᵀ, G·W and Gᵀ·E for W of C and of C' rows
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import torch

import ree_kernels
from ree_kernels import contract, sample_classes
from ree_kernels.backends import kernel_op


def timed(cases: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, float]:
    """The median time of each case, the cases taken in turn in each round (after a warm-up
    round), so that a machine whose load changes during the run slows all of them alike."""
    times: Dict[str, list] = {name: [] for name in cases}
    for round_ in range(repeats + 1):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            if round_ > 0:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--machine", default=platform.processor() or platform.machine(),
                        help="what the results file says the machine is")
    parser.add_argument("--out", type=Path, help="a JSON file for the results (default: print only)")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(args.batch, args.dim, generator=g).requires_grad_(True)
    weight = (torch.randn(args.classes, args.dim, generator=g) * 0.01).requires_grad_(True)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g)
    draw = sample_classes(labels, args.classes, args.rate, ignore_index=-100, generator=g)
    sampled = draw.class_index.numel()

    def step(*call_args, **options) -> None:
        emb.grad = weight.grad = None
        ree_kernels.arcface_head(*call_args, backend="cpu", **options).loss.backward()

    def full() -> None:
        step(emb, weight, labels)

    def with_index() -> None:
        d = sample_classes(labels, args.classes, args.rate, ignore_index=-100, generator=g)
        step(emb, weight, d.labels, class_index=d.class_index)

    coef = contract.loss_coefficients(draw.labels, None, -100, "mean", torch.float32)

    def sampled_op() -> None:
        with torch.no_grad():
            kernel_op("cpu", "head_forward_with_grad")(emb, weight, draw.labels, coef, 64.0, 0.5, "arcface", -100, 0,
                                                       0.0, None, "product", draw.class_index)

    compact = torch.randn(sampled, args.dim, generator=g)

    def grad_scatter() -> None:
        torch.zeros(args.classes, args.dim).index_copy_(0, draw.class_index, compact)

    def gathered() -> None:
        step(emb, weight[draw.class_index], draw.labels)

    def floor(rows: int) -> Callable[[], None]:
        w = weight.detach()[:rows]
        e = emb.detach()
        s = torch.empty(args.batch, rows)

        def run() -> None:
            torch.mm(e, w.t(), out=s)
            torch.mm(s, w)
            torch.mm(s.t(), e)

        return run

    cases = {"full": full, "sampled": with_index,
             "draw": lambda: sample_classes(labels, args.classes, args.rate, ignore_index=-100, generator=g),
             "sampled-op": sampled_op, "grad-scatter": grad_scatter, "gathered": gathered,
             "floor-full": floor(args.classes), "floor-sampled": floor(sampled)}
    load_before = os.getloadavg()
    results = timed(cases, args.repeats)
    for name, seconds in results.items():
        print(f"{name:14s} {seconds:8.3f} s")
    report = {
        "shape": {"B": args.batch, "C": args.classes, "D": args.dim, "rate": args.rate, "sampled": sampled},
        "dtype": "float32", "repeats": args.repeats, "statistic": "median seconds per step (forward + backward)",
        "machine": args.machine, "threads": torch.get_num_threads(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "torch": torch.__version__, "seconds": results,
        "ratios": {"full / sampled": results["full"] / results["sampled"],
                   "sampled / floor-sampled": results["sampled"] / results["floor-sampled"],
                   "sampled-op / floor-sampled": results["sampled-op"] / results["floor-sampled"],
                   "full / floor-full": results["full"] / results["floor-full"]},
    }
    print(json.dumps(report["ratios"], indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
