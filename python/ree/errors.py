"""User mistakes, and how the `ree` command reports them.

A mistake in what the user gave (a flag value, a config file, a data or checkpoint file, a device
the machine lacks, a package the install lacks) ends in one line `ree <command>: error: …` on
stderr and exit status 2, never a traceback; anything else is a bug and keeps its traceback.
`--debug` shows the traceback of a user error as well.

Modules mark their user-facing errors by raising a `UserError` subclass; each also derives from
the built-in type callers already catch (`ConfigError` is a `ValueError`, and so on), so library
code that catches `ValueError` keeps working. `run_command` is the one place that turns them into
the line; every subcommand runs through it."""
from __future__ import annotations

import sys
from typing import Callable, Optional, TextIO

USAGE_ERROR = 2
"""The exit status of a user mistake (argparse's)."""
INTERRUPTED = 130
"""The exit status after Ctrl-C or SIGTERM (128 + SIGINT, the shell's convention)."""


class UserError(Exception):
    """A mistake in the user's input or environment; the message says what, naming the flag,
    key or file, and what to do."""


class ConfigError(UserError, ValueError):
    """A run configuration that cannot be used (a bad value, an unknown key, an unreadable file)."""


class DeviceError(UserError, ValueError):
    """A device or kernel backend that this machine does not have."""


class DataError(UserError, ValueError):
    """A data file or folder that cannot be read as what it should be (names the file)."""


class RunFolderError(UserError, FileExistsError):
    """An output folder that already holds a run (and neither --resume nor --overwrite)."""


class MissingExtra(UserError, ImportError):
    """An optional package the command needs is not installed; the message names the extra."""


EXTRAS = {
    # import name: (package on PyPI, the ree-kernels extra that installs it)
    "PIL": ("Pillow", "train"),
    "matplotlib": ("matplotlib", "train"),
    "tqdm": ("tqdm", "train"),
    "skimage": ("scikit-image", "train"),
    "sklearn": ("scikit-learn", "train"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "onnx": ("onnx", "export"),
    "onnxscript": ("onnxscript", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "triton": ("triton", "triton"),
}
"""The optional dependencies of pyproject.toml's extras, by the name they are imported as."""


def missing_extra(err: ModuleNotFoundError) -> Optional[MissingExtra]:
    """The `MissingExtra` for a failed import of an optional dependency (None for any other
    module: a missing core module is a broken install, reported with its traceback)."""
    top = (err.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    package, extra = EXTRAS[top]
    return MissingExtra(f"this command needs {package}, which is not installed: "
                        f"pip install 'ree-kernels[{extra}]' (or pip install {package})")


def one_line(message: str) -> str:
    """`message` on one line (a multi-line message from a library is joined with '; ')."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run_command(command: str, body: Callable[[], int], *, debug: bool = False, stream: Optional[TextIO] = None) -> int:
    """Runs `body` (a subcommand) and returns its exit status; a `UserError` (or the import of a
    missing optional dependency) becomes one line `ree <command>: error: …` on `stream` (stderr)
    and USAGE_ERROR, a KeyboardInterrupt one line and INTERRUPTED. With `debug`, both are raised
    instead, with their tracebacks. Other exceptions (bugs) propagate unchanged."""
    stream = stream or sys.stderr
    try:
        return body()
    except UserError as err:
        if debug:
            raise
        print(f"ree {command}: error: {one_line(str(err))}", file=stream)
        return USAGE_ERROR
    except ModuleNotFoundError as err:
        extra = missing_extra(err)
        if extra is None or debug:
            raise
        print(f"ree {command}: error: {extra}", file=stream)
        return USAGE_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"ree {command}: interrupted", file=stream)
        return INTERRUPTED
