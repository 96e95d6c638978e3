"""Rewrites the kernel launches of a .cu file for the CUDA emulation (tests/cuda_emulation): each
`kernel<<<config>>>(args)` becomes `::ree_emulation::launch(kernel, config)(args)`, which g++
compiles against include/cuda_runtime.h. Nothing else in the file changes; a `#line` directive
keeps g++'s messages pointing at the original file and line.

Usage: python rewrite_launches.py SOURCE.cu OUTPUT.cpp
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

# A kernel name (qualified, with one level of template arguments), then the configuration.
LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(?P<config>.*?)>>>", re.DOTALL)


def rewrite(source: str) -> tuple[str, int]:
    """The source with every launch rewritten, and the number of launches."""
    return LAUNCH.subn(lambda m: f"::ree_emulation::launch({m['kernel']}, {m['config']})", source)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    source, output = Path(argv[1]), Path(argv[2])
    text, launches = rewrite(source.read_text())
    if "<<<" in text or ">>>" in text:
        print(f"{source}: a launch the rewrite does not recognise is left", file=sys.stderr)
        return 1
    output.parent.mkdir(parents=True, exist_ok=True)
    new = f'#line 1 "{source.resolve()}"\n{text}'
    if not output.exists() or output.read_text() != new:  # an unchanged file keeps ninja from recompiling it
        output.write_text(new)
    print(f"{source}: {launches} launches rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
