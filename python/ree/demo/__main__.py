"""`python -m ree.demo`: the demo (`ree.demo.run_demo`), or the synthetic tuning run with --tune."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __doc__ as DOC
from . import run_demo


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ree.demo", description=DOC.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=None, help="default runs/demo (runs/tune with --tune)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke-test run (numbers meaningless)")
    parser.add_argument("--lfw", type=Path, default=None, help="LFW folder or .tgz (default: $REE_LFW_DIR, "
                        "then scikit-learn's cache)")
    parser.add_argument("--synthetic", action="store_true", help="the synthetic demo even where LFW is found")
    parser.add_argument("--from-scratch", action="store_true",
                        help="the small model trained from scratch on LFW even where SFace is found")
    parser.add_argument("--tune", action="store_true", help="the synthetic validation tuning grid instead of the demo")
    args = parser.parse_args(argv)
    if args.tune:
        from .tuning import run_tuning

        run_tuning(args.output or Path("runs/tune"))
    else:
        run_demo(args.output or Path("runs/demo"), quick=args.quick, lfw=args.lfw, synthetic=args.synthetic,
                 from_scratch=args.from_scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
