"""The `ree` command's entry point (`ree`, `python -m ree`): process settings that must be in
place before torch loads OpenMP, then `ree.cli.main`. It imports nothing heavy itself, and
`ree/__init__.py` imports torch only on first use, so that these settings take effect."""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Environment defaults for OpenMP, unless the user set them: idle OpenMP threads sleep instead of
spinning. On a loaded machine spinning threads steal the cores the working ones need (training
ran 4.5 × slower on a busy 2-core machine); on an idle one the cost of waking them is small
(README, "Train or evaluate yourself"). libgomp reads these once, when torch loads it."""


def set_openmp_defaults() -> None:
    """Sets OPENMP_DEFAULTS where the environment lacks them. Effective only before torch is
    imported (a warning otherwise, since the setting would then silently do nothing)."""
    missing = {k: v for k, v in OPENMP_DEFAULTS.items() if k not in os.environ}
    if missing and "torch" in sys.modules:
        print(f"ree: torch was imported before the OpenMP defaults {missing} could be set: they have no effect",
              file=sys.stderr)
    os.environ.update(missing)


def main(argv: Optional[Sequence[str]] = None) -> int:
    set_openmp_defaults()
    from .cli import main as cli_main

    return cli_main(argv)
