#!/usr/bin/env python3
"""Benchmarks of the REE ops against the matmul floor, eager PyTorch and torch.compile (docs/spec.md §6).

    python benchmarks/run.py --suite cpu            # what `make bench` runs (< 10 min, 2 cores)
    python benchmarks/run.py --suite quick          # a subset, about 2 min
    python benchmarks/run.py --suite gpu --out $OUT # H100/H200 (`make gpu-check`)
    python benchmarks/run.py --suite quick --shape 64,2048,32 --providers floor,eager --out /tmp/b

Writes <kernel>_<device>_<suite>.csv, summary_<device>_<suite>.json and one PNG per sweep to
--out (default benchmarks/results/), then prints the summary table.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import traceback
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import harness, report  # noqa: E402
from benchmarks.harness import Budget, Stats  # noqa: E402
from benchmarks.providers import (  # noqa: E402
    DIFFERENTIABLE,
    EXACT_COUNTERPART,
    FILTER_EPS,
    KERNELS,
    MODES,
    PROVIDERS,
    Case,
    Unavailable,
    build,
    gradients_in_forward,
    make_inputs,
)
from benchmarks.report import MEMORY_MODE, Key  # noqa: E402

Shape = Tuple[int, int, int]


@dataclass(frozen=True)
class Sweep:
    """Providers × shapes × modes of one kernel; one PNG. Aux shapes have C = 0."""

    name: str
    kernel: str
    providers: Tuple[str, ...]
    modes: Tuple[str, ...]
    shapes: Tuple[Shape, ...]
    dtype: str


@dataclass(frozen=True)
class Suite:
    device: str
    sweeps: Tuple[Sweep, ...]
    budget: Budget
    about: str


GPU_HEAD = ("floor", "eager", "compiled", "cuda", "triton", "triton-filter", "cce", "liger")
SUITES: Dict[str, Suite] = {
    "cpu": Suite("cpu", (
        Sweep("target", "head", ("floor", "eager", "compiled", "cce-compile", "cpu"), MODES, ((256, 50_000, 512),),
              "float32"),
        Sweep("classes", "head", ("floor", "eager", "cpu"), ("full",),
              tuple((256, c, 512) for c in (10_000, 25_000, 50_000, 100_000, 200_000)), "float32"),
        Sweep("aux", "aux", ("eager", "cpu"), MODES, ((1024, 0, 512),), "float32"),
    ), Budget(warmup_s=0.25, measure_s=2.0, min_reps=5, max_reps=500),
        "head B=256 D=512 C=50k float32 (floor, eager, compiled, cce-compile, cpu; fwd/bwd/full), a C sweep "
        "10k-200k (floor, eager, cpu; full), aux B=1024 D=512 (eager, cpu); < 10 min on 2 cores"),
    "quick": Suite("cpu", (
        Sweep("head", "head", ("floor", "eager", "cce-compile", "cpu"), ("full",), ((256, 50_000, 512),), "float32"),
        Sweep("aux", "aux", ("eager", "cpu"), ("full",), ((1024, 0, 512),), "float32"),
    ), Budget(warmup_s=0.1, measure_s=0.5, min_reps=3, max_reps=200),
        "head B=256 D=512 C=50k float32 (floor, eager, cce-compile, cpu) and aux B=1024 D=512 (eager, cpu), "
        "forward+backward; about 2 min"),
    "gpu": Suite("cuda", (
        Sweep("c1m", "head", GPU_HEAD, MODES, ((1024, 1_000_000, 512),), "bfloat16"),
        Sweep("c100k", "head", GPU_HEAD, MODES, ((512, 100_000, 512),), "bfloat16"),
        Sweep("aux", "aux", ("eager", "cuda", "triton"), MODES, ((1024, 0, 512),), "bfloat16"),
    ), Budget(warmup_s=0.1, measure_s=0.5, min_reps=10, max_reps=200),
        "head B=1024 C=1M and B=512 C=100k, D=512 bf16 (floor, eager, compiled, cuda, triton, "
        "triton-filter, cce, liger), aux B=1024 D=512 bf16 (eager, cuda, triton); a few minutes on an H100"),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="suites:\n" + "\n".join(f"  {name}: {s.about}" for name, s in SUITES.items()) +
        "\n\nproviders: " + ", ".join(PROVIDERS) + ". One that cannot run here is skipped with "
        "the reason printed.\nWorkspace (peak_mem_mb) is measured over forward+backward (mode full).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--shape", action="append", metavar="B,C,D",
                        help="replace every sweep's shapes (repeatable; aux uses B and D)")
    parser.add_argument("--kernels", help=f"comma-separated subset of {','.join(KERNELS)}")
    parser.add_argument("--providers", help="comma-separated providers, replacing each sweep's")
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="replace the suite's dtype")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="replace the suite's device")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="output folder (default: benchmarks/results)")
    parser.add_argument("--repeats", type=int,
                        help="exactly this many timed repeats (default: the suite's time budget)")
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--cos-pos", type=float, default=0.8,
                        help="cosine of each embedding to its own prototype (default 0.8, a trained "
                             "state; 0: i.i.d. random inputs); only the gradient filter depends on it")
    parser.add_argument("--eager-limit-gb", type=float,
                        help="skip eager/compiled heads whose B x C tensors would exceed this "
                             "(default: a quarter of the free RAM, or 60%% of the GPU's memory)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's); part of the device name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mem-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0.0 <= args.cos_pos < 1.0:
        parser.error("--cos-pos must lie in [0, 1)")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    try:
        args.shape = [parse_shape(s) for s in args.shape or ()]
        args.kernels = parse_list(args.kernels, KERNELS, "--kernels")
        args.providers = parse_list(args.providers, PROVIDERS, "--providers")
        args.modes = parse_list(args.modes, MODES, "--modes")
    except ValueError as err:
        parser.error(str(err))
    return args


def parse_shape(text: str) -> Shape:
    try:
        B, C, D = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--shape takes B,C,D (three integers), got {text!r}") from None
    if min(B, C, D) <= 0:
        raise ValueError(f"--shape sizes must be positive, got {text!r}")
    return B, C, D


def parse_list(text: Optional[str], known: Sequence[str], flag: str) -> Optional[Tuple[str, ...]]:
    if text is None:
        return None
    items = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in items if v not in known]
    if unknown or not items:
        raise ValueError(f"{flag}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(known)}")
    return items


def selected_sweeps(suite: Suite, args: argparse.Namespace) -> List[Sweep]:
    sweeps = []
    for sweep in suite.sweeps:
        if args.kernels and sweep.kernel not in args.kernels:
            continue
        if args.shape:
            shapes = tuple((B, 0, D) if sweep.kernel == "aux" else (B, C, D) for B, C, D in args.shape)
            sweep = replace(sweep, shapes=tuple(dict.fromkeys(shapes)))
        sweep = replace(sweep, providers=args.providers or sweep.providers, modes=args.modes or sweep.modes,
                        dtype=args.dtype or sweep.dtype)
        sweeps.append(sweep)
    return sweeps


def default_eager_limit(device: str) -> float:
    if device == "cuda" and torch.cuda.is_available():
        return 0.6 * torch.cuda.get_device_properties(0).total_memory
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return 0.25 * int(line.split()[1]) * 1024
    return 4 * 2**30


class Run:
    """Measures the sweeps' cases, once each, and keeps what was measured, skipped or failed."""

    def __init__(self, args: argparse.Namespace, device: str, budget: Budget):
        self.args, self.device, self.budget = args, device, budget
        self.eager_limit = (args.eager_limit_gb * 2**30 if args.eager_limit_gb is not None
                            else default_eager_limit(device))
        self.results: report.Results = {}
        self.skipped: Dict[Tuple[str, str, str], List[str]] = {}
        self.failures: List[str] = []
        self.accuracy: List[dict] = []
        self.unavailable: set = set()
        self.cache_bytes = harness.last_level_cache_bytes()

    def skip(self, case: Case, reason: str) -> None:
        where = report.shape_text(case.kernel, (case.B, case.C, case.D)) + f" {case.dtype}"
        print(f"  skip {case.kernel}/{case.provider} ({where}): {reason}", flush=True)
        self.skipped.setdefault((case.kernel, case.provider, reason), []).append(where)

    def measure(self, sweep: Sweep, shape: Shape, provider: str) -> None:
        case = Case(sweep.kernel, provider, *shape, sweep.dtype, self.device)
        if case in self.unavailable or all(key in self.results for key in self.keys(case, sweep.modes)):
            return  # reported or measured by an earlier sweep
        try:
            forward, backward = build(case, eager_limit_bytes=self.eager_limit)
            self._measure(case, sweep.modes, forward, backward)
        except Unavailable as err:
            self.unavailable.add(case)
            self.skip(case, str(err))
        except ModuleNotFoundError as err:  # a backend whose module has not landed yet
            if not (err.name or "").startswith("ree_kernels"):
                raise
            self.unavailable.add(case)
            self.skip(case, f"not available: {err}")
        except torch.cuda.OutOfMemoryError:
            self.unavailable.add(case)
            self.skip(case, "out of GPU memory")
        except Exception as err:  # noqa: BLE001 -- reported, counted, and the run goes on
            traceback.print_exc()
            message = f"{case.kernel}/{case.provider} {report.shape_text(case.kernel, shape)} {case.dtype}: " \
                      f"{type(err).__name__}: {err}"
            print(f"  FAILED {message}", flush=True)
            self.failures.append(message)
        finally:
            gc.collect()
            if self.device == "cuda":
                torch.cuda.empty_cache()

    def keys(self, case: Case, modes: Sequence[str]) -> List[Key]:
        keys = [Key(case.kernel, case.provider, mode, "time_ms", case.B, case.C, case.D, case.dtype) for mode in modes]
        if MEMORY_MODE in modes and not self.args.no_memory:
            keys.append(Key(case.kernel, case.provider, MEMORY_MODE, "peak_mem_mb", case.B, case.C, case.D, case.dtype))
        return keys

    def _measure(self, case: Case, modes: Sequence[str], forward, backward) -> None:
        args = self.args
        sets = [make_inputs(case, cos_pos=args.cos_pos, seed=args.seed)]
        if self.device == "cpu":  # CUDA flushes its L2 instead
            count = harness.rotation_sets(harness.tensor_bytes(sets[0].values()), self.cache_bytes)
            sets += [make_inputs(case, cos_pos=args.cos_pos, seed=args.seed + i) for i in range(1, count)]

        def full(x):
            return backward(forward(x))

        steps = {
            "fwd": (lambda i: sets[i % len(sets)], forward),
            "bwd": (lambda i: forward(sets[i % len(sets)]), backward),
            "full": (lambda i: sets[i % len(sets)], full),
        }
        label = f"{case.kernel:4} {report.shape_text(case.kernel, (case.B, case.C, case.D)):22} " \
                f"{case.dtype:8} {case.provider:13}"
        for mode in modes:
            key = Key(case.kernel, case.provider, mode, "time_ms", case.B, case.C, case.D, case.dtype)
            if key in self.results:
                continue
            samples = harness.measure_time(*steps[mode], self.device, self.budget)
            stats = self.results[key] = Stats.of(samples)
            print(f"  {label} {mode:4}  {stats.p50:10.4g} ms  (p20 {stats.p20:.4g}, p80 {stats.p80:.4g}, "
                  f"{len(samples)} reps)", flush=True)
        key = Key(case.kernel, case.provider, MEMORY_MODE, "peak_mem_mb", case.B, case.C, case.D, case.dtype)
        if MEMORY_MODE in modes and not args.no_memory and key not in self.results:
            if self.device == "cuda":
                workspace = harness.cuda_workspace(sets[0], full)
            else:
                del sets[1:]  # the worker process holds its own inputs
                workspace = harness.subprocess_workspace(worker_argv(case, args.cos_pos, args.seed))
            mb = workspace / harness.MB
            self.results[key] = Stats(mb, mb, mb)
            print(f"  {label} {MEMORY_MODE:4}  workspace {mb:.2f} MB", flush=True)
        if case.provider in EXACT_COUNTERPART:
            self.accuracy.append(approximation_error(case, EXACT_COUNTERPART[case.provider], sets[0],
                                                     forward, backward, self.eager_limit))


def approximation_error(case: Case, exact_provider: str, x, forward, backward, eager_limit: float) -> dict:
    """The relative error of an approximate provider's loss and gradients against the exact
    provider it approximates, on the same inputs."""
    exact_forward, exact_backward = build(replace(case, provider=exact_provider), eager_limit_bytes=eager_limit)
    ours_out = forward(x)
    ours = (ours_out[0][0].detach(), *backward(ours_out))
    exact_out = exact_forward(x)
    exact = (exact_out[0][0].detach(), *exact_backward(exact_out))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.float(), b.float()
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    names = ("loss", *(f"grad_{name}" for name in DIFFERENTIABLE[case.kernel]))
    record = {"kernel": case.kernel, "provider": case.provider, "exact": exact_provider, "B": case.B,
              "C": case.C, "D": case.D, "dtype": case.dtype}
    record.update({f"{n}_rel_error": rel(a, b) for n, a, b in zip(names, ours, exact)})
    print(f"  {error_text(record)}", flush=True)
    return record


def error_text(record: dict) -> str:
    errors = ", ".join(f"{k[:-len('_rel_error')]} {v:.3g}" for k, v in record.items() if k.endswith("_rel_error"))
    where = report.shape_text(record["kernel"], (record["B"], record["C"], record["D"]))
    return f"{record['provider']} vs {record['exact']} ({where} {record['dtype']}), relative error: {errors}"


def worker_argv(case: Case, cos_pos: float, seed: int) -> List[str]:
    """The command that measures `case`'s CPU workspace in a fresh process (`mem_worker`)."""
    spec = {"case": asdict(case), "cos_pos": cos_pos, "seed": seed, "threads": torch.get_num_threads()}
    return [sys.executable, str(Path(__file__).resolve()), "--mem-worker", json.dumps(spec)]


def mem_worker(spec: dict) -> int:
    """In a fresh process: one warm-up forward+backward, then the workspace of the next one."""
    torch.set_num_threads(spec["threads"])
    case = Case(**spec["case"])
    forward, backward = build(case, eager_limit_bytes=math.inf)
    x = make_inputs(case, cos_pos=spec["cos_pos"], seed=spec["seed"])

    def full(inputs):
        return backward(forward(inputs))

    full(x)
    print(json.dumps({"workspace_bytes": harness.rss_workspace(x, full)}))
    return 0


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def busy_warning(load: Optional[float]) -> Optional[str]:
    """A warning when, before the run, other processes compete for the cores: torch's OpenMP
    threads then wait on each other at every barrier, and CPU timings grow by orders of magnitude."""
    cores = os.cpu_count() or 1
    if load is None or load <= 0.5 * cores:
        return None
    return (f"load average {load:.1f} on {cores} cores: CPU timings are unreliable; rerun on a quiet "
            "machine (or compare with --threads 1)")


@dataclass(frozen=True)
class Setting:
    """What every file of one run is named and stamped with."""

    label: str
    device: str
    device_name: str
    commit: str
    timestamp: str
    load_start: Optional[float]

    @property
    def resolution_mb(self) -> float:
        return harness.CUDA_RESOLUTION_MB if self.device == "cuda" else harness.RSS_RESOLUTION_MB


def announce(args: argparse.Namespace, device: str) -> Tuple[Setting, Optional[str]]:
    """The run's setting, printed with the busy-machine warning (also returned) when there is one."""
    custom = any(v for v in (args.shape, args.kernels, args.providers, args.modes, args.dtype, args.device))
    setting = Setting(label=args.suite + ("-custom" if custom else ""), device=device,
                      device_name=report.device_name(device), commit=report.git_commit(ROOT),
                      timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"), load_start=load_average())
    print(f"suite {setting.label} on {setting.device_name} (torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, load {setting.load_start}), commit {setting.commit}, inputs at cos_pos {args.cos_pos}", flush=True)
    busy = busy_warning(setting.load_start)
    if busy:
        print(busy, flush=True)
    return setting, busy


def measure_sweeps(args: argparse.Namespace, device: str, budget: Budget, sweeps: Sequence[Sweep]) -> Run:
    run = Run(args, device, budget)
    for sweep in sweeps:
        print(f"sweep {sweep.name}: {sweep.kernel} {sweep.dtype}, {', '.join(sweep.providers)}", flush=True)
        for shape in sweep.shapes:
            for provider in sweep.providers:
                run.measure(sweep, shape, provider)
    return run


def write_csvs(run: Run, out: Path, setting: Setting) -> List[Path]:
    """One CSV per kernel measured."""
    written = []
    for kernel in KERNELS:
        mine = {k: v for k, v in run.results.items() if k.kernel == kernel}
        if mine:
            path = out / f"{kernel}_{setting.device_name}_{setting.label}.csv"
            report.write_csv(path, report.csv_rows(mine, setting.device_name, setting.commit, setting.timestamp))
            written.append(path)
    return written


def write_plots(run: Run, sweeps: Sequence[Sweep], out: Path, setting: Setting,
                mode_notes: Dict[Tuple[str, str], str]) -> Tuple[List[Path], List[str]]:
    """One PNG per sweep measured; (the PNGs, why plotting stopped if it did)."""
    written, notes = [], []
    for sweep in sweeps:
        if not any(k.kernel == sweep.kernel for k in run.results):
            continue
        path = out / f"{sweep.kernel}_{setting.device_name}_{setting.label}_{sweep.name}.png"
        title = f"{sweep.kernel} {sweep.dtype} on {setting.device_name} ({setting.label}, {setting.commit})"
        footnotes = [note for (kernel, provider), note in mode_notes.items()
                     if kernel == sweep.kernel and provider in sweep.providers and set(sweep.modes) - {"full"}]
        why_not = report.plot_sweep(path, title, sweep.kernel, sweep.shapes, sweep.providers, sweep.modes,
                                    sweep.dtype, run.results, footnotes)
        if why_not:
            notes.append(why_not)
            break
        written.append(path)
    return written, notes


def write_summary(run: Run, args: argparse.Namespace, budget: Budget, setting: Setting,
                  mode_notes: Dict[Tuple[str, str], str]) -> Path:
    path = args.out / f"summary_{setting.device_name}_{setting.label}.json"
    report.write_json(path, {
        "suite": setting.label, "device": setting.device_name, "commit": setting.commit,
        "timestamp": setting.timestamp, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_average_1min": {"start": setting.load_start, "end": load_average()},
        "cos_pos": args.cos_pos, "seed": args.seed, "grad_filter_eps": FILTER_EPS,
        "budget": asdict(budget),
        "workspace": "peak memory of forward+backward minus the memory before it and the returned "
                     "gradients (docs/spec.md §4); CPU: peak RSS in a fresh process; MB = 2**20 bytes",
        "workspace_resolution_mb": setting.resolution_mb,
        "ratios": report.ratios(run.results, setting.resolution_mb),
        "approximation_errors": run.accuracy,
        "notes": [f"{kernel}/{note}" for (kernel, _), note in mode_notes.items()],
        "skipped": [{"kernel": k, "provider": p, "reason": r, "where": w} for (k, p, r), w in run.skipped.items()],
        "failures": run.failures,
    })
    return path


def print_outcome(run: Run, setting: Setting, notes: List[str], written: List[Path]) -> None:
    print()
    for (kernel, provider, reason), where in run.skipped.items():
        print(f"skipped {kernel}/{provider} ({len(where)}x): {reason}")
    for note in notes:
        print(f"note: {note}")
    for record in run.accuracy:
        print(error_text(record))
    for failure in run.failures:
        print(f"FAILED {failure}")
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"\n{setting.label} on {setting.device_name}, commit {setting.commit}; p50 ms; "
          "work = workspace (docs/spec.md §4) of fwd+bwd")
    print(report.summary_table(run.results, setting.resolution_mb))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.mem_worker:
        return mem_worker(json.loads(args.mem_worker))
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = SUITES[args.suite]
    device = args.device or suite.device
    if device == "cuda" and not torch.cuda.is_available():
        print(f"suite {args.suite!r} runs on CUDA, and there is no CUDA device here", file=sys.stderr)
        return 2
    sweeps = selected_sweeps(suite, args)
    setting, busy = announce(args, device)
    budget = suite.budget
    if args.repeats:
        budget = replace(budget, warmup_s=0.0, min_reps=args.repeats, max_reps=args.repeats)
    run = measure_sweeps(args, device, budget, sweeps)

    args.out.mkdir(parents=True, exist_ok=True)
    written = write_csvs(run, args.out, setting)
    # fwd and bwd alone mislead for providers that compute the gradients in the forward.
    split_modes = {(k.kernel, k.provider) for k in run.results if k.mode in ("fwd", "bwd")}
    mode_notes = {kp: note for kp in sorted(split_modes) if (note := gradients_in_forward(*kp))}
    plots, notes = ([], []) if args.no_plot else write_plots(run, sweeps, args.out, setting, mode_notes)
    written += plots
    written.append(write_summary(run, args, budget, setting, mode_notes))
    notes += [f"{kernel}/{note}" for (kernel, _), note in mode_notes.items()] + ([busy] if busy else [])
    print_outcome(run, setting, notes, written)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
