"""`python -m ree` / `ree`: train | eval | quality | export | demo | lfw.

Every subcommand runs through `ree.errors.run_command`: a user mistake ends in one line
`ree <command>: error: …` and exit status 2, a bug in a traceback (`--debug` shows both)."""
from __future__ import annotations

import argparse
import ast
import csv
import os
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import errors, runs
from .config import CHOICES, DEVICES, FIELD_HELP, TrainConfig
from .models.ree_model import SERFIQ_PASSES


def _optional_int(text: str) -> Optional[int]:
    return None if text.lower() == "none" else int(text)


def _process_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of processes, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _key_value(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--batch-size for batch_size); unset flags stay unset,
    so a --config file or a resumed checkpoint supplies them."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group(
        "run configuration (defaults: TrainConfig, or --config, or the resumed checkpoint)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        kind = hints[f.name]
        kwargs: Dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{FIELD_HELP[f.name]} (default: {default!r})"}
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name == "synthetic":
            group.add_argument(flag, type=_key_value, action="append", metavar="KEY=VALUE",
                               help=FIELD_HELP[f.name] + " (repeatable)",
                               dest=f.name, default=argparse.SUPPRESS)
        elif f.name == "milestones":
            group.add_argument(flag, type=float, nargs="+", metavar="FRACTION", **kwargs)
        elif kind == Optional[int]:
            group.add_argument(flag, type=_optional_int, metavar="INT|none", **kwargs)
        else:
            group.add_argument(flag, type=kind, choices=CHOICES.get(f.name), **kwargs)


def _debug_flag() -> argparse.ArgumentParser:
    """--debug, accepted before the subcommand and after it."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (user mistakes are otherwise one line)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    debug = _debug_flag()
    parser = argparse.ArgumentParser(prog="ree", description="REE face recognition: training, evaluation, "
                                     "quality scoring and ONNX export on the ree_kernels ops.", parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,quality,export,demo,lfw}")

    train = sub.add_parser("train", help="train REE (or the ArcFace baseline with --method arcface)", parents=[debug])
    train.add_argument("--config", type=Path, help="a TrainConfig JSON file (flags override it)")
    train.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                       help="continue a run bitwise (its config comes from the checkpoint); without a path, "
                            "<output-dir>/last.pt")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --output-dir (its checkpoint, log and TensorBoard files)")
    train.add_argument("--lfw", type=Path, default=None, help="LFW folder or .tgz for --data lfw* (default: "
                       "$REE_LFW_DIR, then scikit-learn's cache)")
    train.add_argument("--nproc", type=_process_count, metavar="N",
                       help="train in N processes on this machine (one per GPU; gloo on the CPU), launched "
                            "through torch.distributed.run; --batch-size is the global batch")
    _add_config_flags(train)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint on the synthetic test split (docs/spec.md §7)",
                              parents=[debug])
    evaluate.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by ree train")
    evaluate.add_argument("--output", type=Path, help="report directory (default: next to the checkpoint)")
    evaluate.add_argument("--data", help="'synthetic' (its test split), an ImageFolder directory or a .rec file "
                          "(every image); default: the checkpoint's training source")
    evaluate.add_argument("--pairs", type=int, default=6000, help="verification pairs (fewer if the set is small)")
    evaluate.add_argument("--device", choices=DEVICES, default="auto", help="auto (CUDA when present), cpu or cuda")

    quality = sub.add_parser(
        "quality",
        help="score a folder of face crops: one CSV row per image with every quality score the checkpoint has",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=QUALITY_COLUMNS, parents=[debug])
    quality.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by ree train")
    quality.add_argument("--images", type=Path, required=True,
                         help="folder searched recursively for images (any size, RGB or grayscale; each is resized "
                              "to the model input)")
    quality.add_argument("--output", type=Path, required=True, help="CSV file to write")
    quality.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    quality.add_argument("--device", choices=DEVICES, default="auto", help="auto (CUDA when present), cpu or cuda")
    export = sub.add_parser("export", help="write ONNX (outputs: embedding, quality), checked with onnxruntime",
                            parents=[debug])
    export.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by ree train")
    export.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch.onnx's)")
    export.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")

    demo = sub.add_parser("demo", help="the main job: LFW-VLR with REE, ArcFace and CR-FIQA (one seed) when LFW is "
                          "found, else the synthetic demo; writes a report", parents=[debug])
    demo.add_argument("--output", type=Path, default=Path("runs/demo"), help="the report's folder")
    demo.add_argument("--quick", action="store_true", help="a tiny smoke-test run (minutes less, numbers meaningless)")
    demo.add_argument("--lfw", type=Path, default=None, help="LFW folder or .tgz (default: $REE_LFW_DIR, then "
                      "scikit-learn's cache)")
    demo.add_argument("--synthetic", action="store_true", help="the synthetic demo even where LFW is found")
    # Its options are `python -m ree.lfw`'s, passed on unparsed (main() collects them).
    lfw = sub.add_parser("lfw", help="the LFW-VLR benchmark: main table over seeds, or the ablations (docs/lfw.md); "
                         "`ree lfw --help` lists its options", add_help=False)
    for command in (train, evaluate, quality, export, demo, lfw):
        command.set_defaults(subparser=command)  # its own usage line in errors
    return parser


def _train_config(args: argparse.Namespace) -> Tuple[TrainConfig, Optional[Path]]:
    """The run's TrainConfig and the checkpoint to resume (None: a new run). A resumed run takes
    its config from the checkpoint (from --config where given); flags override either."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if "synthetic" in overrides:
        overrides["synthetic"] = dict(overrides["synthetic"])
    base: Dict[str, Any] = {}
    if args.config is not None:
        base = TrainConfig.load(args.config).to_dict()
    resume: Optional[Path] = None
    if args.resume == "auto":
        output_dir = overrides.get("output_dir", base.get("output_dir", TrainConfig.output_dir))
        resume = Path(output_dir) / "last.pt"
    elif args.resume is not None:
        resume = Path(args.resume)
    if resume is not None and args.config is None:
        from .checkpoint import load

        base = dict(load(resume, required=("config",))["config"])
    return TrainConfig.from_dict({**base, **overrides}), resume


def _command_train(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    import torch

    from .data.lfw import ENV_VAR
    from .devices import check_backend, resolve_device
    from .distributed import launch, launched_world, process_group_from_env

    if args.overwrite and args.resume is not None:
        parser.error("--overwrite replaces the run that --resume continues: give one of them")
    if args.lfw is not None:
        os.environ[ENV_VAR] = str(args.lfw)  # read where the data is built, here or in torchrun's processes
    config, resume = _train_config(args)
    launched = launched_world()
    if args.nproc is not None and launched is not None and args.nproc != launched:
        parser.error(f"--nproc {args.nproc} in a run whose launcher started {launched} processes: leave --nproc out")
    world = launched or args.nproc or 1
    config.check_world_size(world)
    device = resolve_device(config.device)
    check_backend(config.backend, device)
    cuda = device.type == "cuda"
    runs.claim_for_process(config.output_dir, resume=resume is not None, overwrite=args.overwrite)
    if launched is None and world > 1:
        if cuda and world > torch.cuda.device_count():
            raise errors.DeviceError(f"--nproc {world} needs a GPU per process; torch sees "
                                     f"{torch.cuda.device_count()}")
        return launch(world, _without_nproc(argv), runs.claimed_env(config.output_dir))
    with process_group_from_env(cuda) as ranks:
        return _train(config, resume, ranks.leader)


def _without_nproc(argv: Sequence[str]) -> List[str]:
    """argv without --nproc N (or --nproc=N, or an abbreviation argparse accepts)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        flag = token.split("=", 1)[0]
        if len(flag) > 3 and "--nproc".startswith(flag):
            skip = "=" not in token
            continue
        out.append(token)
    return out


def _train(config: TrainConfig, resume: Optional[Path], leader: bool) -> int:
    """One process's training (every rank runs it; rank 0 writes the files and prints). A
    function of its own, so that the trainer and its DDP model are gone when it returns.
    SIGINT/SIGTERM stop it after the current step with a checkpoint (`ree.runs.StopSignals`)."""
    from .train import Trainer

    with runs.StopSignals(announce=leader) as stop:
        if leader:
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            runs.remove_stale_temporaries(config.output_dir, config.cache_dir)
        trainer = Trainer(config, resume=resume)
        if leader:
            config.save(Path(config.output_dir) / "config.json")
        stop.arm()
        path = trainer.fit(stop_requested=stop)
    if trainer.interrupted:
        if leader:
            print(f"ree train: stopped at step {trainer.step} of {config.steps} ({stop.requested}); checkpoint {path}; "
                  f"continue with: ree train --resume {path}", file=sys.stderr)
        return errors.INTERRUPTED
    if leader:
        print(f"trained {trainer.step} steps; checkpoint {path}")
    return 0


def _command_eval(args: argparse.Namespace) -> int:
    from .evaluation.pipeline import evaluate_checkpoint

    if args.pairs < 2:
        args.subparser.error("--pairs must be at least 2")
    output = args.output or args.checkpoint.parent / "eval"
    try:
        summary = evaluate_checkpoint(args.checkpoint, output, data=args.data, device=args.device,
                                      num_pairs=args.pairs)
    except ValueError as err:
        if isinstance(err, errors.UserError):
            raise
        args.subparser.error(str(err))
    print(summary)
    return 0


def image_paths(folder: Path) -> List[Path]:
    """Image files under `folder`, recursively, sorted."""
    from .data.folders import IMAGE_EXTENSIONS

    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


QUALITY_COLUMNS = f"""CSV columns (one row per image; for every score, higher means better quality):
  path          the image, relative to --images
  xi_hat        REE checkpoints: the predicted recognizability index ξ̂ (the PRM output)
  cr_fiqa       CR-FIQA checkpoints: the regressed certainty ratio (Boutros et al., CVPR 2023)
  feature_norm  ‖v‖ of the unnormalised embedding, read as quality as MagFace does
  ser_fiq       SER-FIQ: agreement of {SERFIQ_PASSES} embeddings with dropout on in the embedding layer, in (0, 1]
                (Terhörst et al., CVPR 2020)
  ers           REE checkpoints: 1 − cos to the centre of the unrecognizable instances (in [0, 2])
"""


def _command_quality(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .checkpoint import load_model
    from .data.folders import load_images
    from .devices import resolve_device
    from .models.ree_model import embed, ers_score

    if not args.images.is_dir():
        parser.error(f"--images {args.images} is not a directory")
    if args.batch_size <= 0:
        parser.error("--batch-size must be positive")
    paths = image_paths(args.images)
    if not paths:
        parser.error(f"--images {args.images} holds no image files")
    device = resolve_device(args.device)
    trained = load_model(args.checkpoint, device)
    method = trained.config.method
    head = {"ree": ["xi_hat"], "crfiqa": ["cr_fiqa"]}.get(method, [])
    with_ers = trained.ui_center is not None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path"] + head + ["feature_norm", "ser_fiq"] + (["ers"] if with_ers else []))
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start:start + args.batch_size]
            images = load_images([str(p) for p in chunk], trained.model.input_size)
            scores = embed(trained.model, images, flip=False, serfiq_passes=SERFIQ_PASSES)
            ers = ers_score(scores.plain, trained.ui_center) if with_ers else None
            for k, path in enumerate(chunk):
                row = [str(path.relative_to(args.images))]
                row += [f"{float(scores.quality[k]):.6f}"] * len(head)
                row += [f"{float(scores.norm[k]):.6f}", f"{float(scores.serfiq[k]):.6f}"]
                row += [f"{float(ers[k]):.6f}"] if ers is not None else []
                out.writerow(row)
    print(f"scored {len(paths)} images -> {args.output}")
    return 0


def _command_export(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .export import export_onnx

    trained = load_model(args.checkpoint)
    diffs = export_onnx(trained.model, args.output, opset=args.opset, check=not args.no_check)
    checked = ", ".join(f"{k} max |onnx - torch| = {v:.2e}" for k, v in diffs.items()) or "not checked"
    print(f"wrote {args.output} ({checked})")
    return 0


def _command_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, quick=args.quick, lfw=args.lfw, synthetic=args.synthetic)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    debug = getattr(args, "debug", False)
    if args.command == "lfw":
        from .lfw.__main__ import main as lfw_main

        return errors.run_command("lfw", lambda: lfw_main(extra), debug=debug)
    if extra:
        args.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    commands = {
        "train": lambda: _command_train(args, args.subparser, argv),
        "eval": lambda: _command_eval(args),
        "quality": lambda: _command_quality(args, args.subparser),
        "export": lambda: _command_export(args),
        "demo": lambda: _command_demo(args),
    }
    return errors.run_command(args.command, commands[args.command], debug=debug)


if __name__ == "__main__":
    sys.exit(main())
