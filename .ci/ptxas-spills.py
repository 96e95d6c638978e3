"""`nvcc -Xptxas -v` over every csrc/cuda/*.cu for each target architecture: a table of each
kernel's registers, spill traffic, stack frame and static shared memory, and a failure on any
spill (a kernel that spills reads and writes local memory on every use of the spilled values).
No GPU is needed: nvcc and ptxas run on the CPU, and the .cu files are torch-free.

Usage: python .ci/ptxas-spills.py [--archs 80 90] [--nvcc nvcc] [--table FILE.md]
Exit status 1 when any kernel spills, 2 when a compile fails.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+)'")
FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
                   r"(?P<loads>\d+) bytes spill loads")
USED = re.compile(r"Used (?P<registers>\d+) registers")
SHARED = re.compile(r"(?P<smem>\d+) bytes smem")


def demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    # The kernel and its template arguments: the namespaces, return type and parameters say nothing here.
    return [re.sub(r"^void |ree::cuda::\(anonymous namespace\)::|\(.*\)$", "", line) for line in out.splitlines()]


def parse(log: str, source: str) -> list[dict]:
    """One row per (kernel, arch) from ptxas's verbose output."""
    rows, row = [], None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            row = {"file": source, "mangled": m["name"], "arch": m["arch"], "registers": None, "stack": None,
                   "stores": None, "loads": None, "smem": 0}
            rows.append(row)
        elif row is not None:
            if m := FRAME.search(line):
                row.update(stack=int(m["stack"]), stores=int(m["stores"]), loads=int(m["loads"]))
            if m := USED.search(line):
                row["registers"] = int(m["registers"])
                if s := SHARED.search(line):
                    row["smem"] = int(s["smem"])
    for row, name in zip(rows, demangle([r["mangled"] for r in rows])):
        row["kernel"] = name
    return rows


def compile_verbose(nvcc: str, source: Path, archs: list[str]) -> str:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([nvcc, "-std=c++17", "-O3", *gencode, "-Xptxas", "-v", f"-I{ROOT / 'csrc' / 'include'}",
                              "-c", str(source), "-o", str(Path(tmp) / "out.o")], capture_output=True, text=True)
    if run.returncode != 0:
        sys.stderr.write(run.stdout + run.stderr)
        raise SystemExit(2)
    return run.stdout + run.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["80", "90"])
    parser.add_argument("--nvcc", default="nvcc")
    parser.add_argument("--table", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    rows = []
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        found = parse(compile_verbose(args.nvcc, source, args.archs), source.name)
        if not found or any(r["registers"] is None or r["stores"] is None for r in found):
            print(f"{source.name}: ptxas printed no complete report; is -Xptxas -v honoured?", file=sys.stderr)
            return 2
        rows += found
    rows.sort(key=lambda r: (r["file"], r["kernel"], r["arch"]))
    lines = ["| file | kernel | arch | registers | spill stores (B) | spill loads (B) | stack (B) | smem (B) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['file']} | `{r['kernel']}` | {r['arch']} | {r['registers']} | {r['stores']} | {r['loads']} | "
              f"{r['stack']} | {r['smem']} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.table:
        version = subprocess.run([args.nvcc, "--version"], capture_output=True, text=True).stdout
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(f"# ptxas report of csrc/cuda (.ci/ptxas-spills.py; nvcc "
                              f"{version.strip().splitlines()[-1]})\n\n{table}\n")
    spilling = [r for r in rows if r["stores"] or r["loads"]]
    for r in spilling:
        print(f"SPILL: {r['kernel']} on {r['arch']}: {r['stores']} B stores, {r['loads']} B loads", file=sys.stderr)
    print(f"{len(rows)} kernel builds, {len(spilling)} with spills")
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
