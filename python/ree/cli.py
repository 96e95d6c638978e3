"""`python -m ree` / `ree`: train | eval | quality | export | demo | lfw.

Every subcommand runs through `ree.errors.run_command`: a user mistake ends in one line
`ree <command>: error: …` and exit status 2, a bug in a traceback (`--debug` shows both)."""
from __future__ import annotations

import argparse
import ast
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
        elif kind == Optional[str]:
            group.add_argument(flag, type=str, **kwargs)
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
    train.add_argument("--insightface-config", type=Path, metavar="FILE",
                       help="an insightface arcface_torch config (configs/*.py), read without running it (flags "
                            "override it; docs/pretrained.md)")
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
    evaluate.add_argument("--device", choices=DEVICES, default="auto", help=FIELD_HELP["device"])

    quality = sub.add_parser(
        "quality",
        help="score a folder of face crops: one CSV row per image with every quality score the checkpoint has",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=QUALITY_COLUMNS, parents=[debug])
    quality.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by ree train")
    quality.add_argument("--images", type=Path, required=True,
                         help="folder searched recursively (linked folders too) for face crops framed as below")
    quality.add_argument("--output", type=Path, required=True, help="CSV file to write")
    quality.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    quality.add_argument("--device", choices=DEVICES, default="auto", help=FIELD_HELP["device"])
    export = sub.add_parser("export", help="write ONNX (outputs: embedding, quality), checked with onnxruntime",
                            parents=[debug])
    export.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by ree train")
    export.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch.onnx's)")
    export.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")

    demo = sub.add_parser("demo", help="the main job: LFW-VLR (one seed) when LFW is found, SFace fine-tuned with REE "
                          "when SFace is found too, else REE, ArcFace and CR-FIQA from scratch; without "
                          "LFW the synthetic demo; writes a report", parents=[debug])
    demo.add_argument("--output", type=Path, default=Path("runs/demo"), help="the report's folder")
    demo.add_argument("--quick", action="store_true", help="a tiny smoke-test run (minutes less, numbers meaningless)")
    demo.add_argument("--lfw", type=Path, default=None, help="LFW folder or .tgz (default: $REE_LFW_DIR, then "
                      "scikit-learn's cache)")
    demo.add_argument("--synthetic", action="store_true", help="the synthetic demo even where LFW is found")
    demo.add_argument("--from-scratch", action="store_true",
                      help="the small model trained from scratch on LFW even where SFace is found")
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
    base.update(_pretrained_fields(args, overrides))
    return TrainConfig.from_dict({**base, **overrides}), resume


def _pretrained_fields(args: argparse.Namespace, overrides: Dict[str, Any]) -> Dict[str, Any]:
    """The fields an --insightface-config file and an --init backbone set (flags override them)."""
    from .distributed import launched_world
    from .insightface_config import train_fields
    from .pretrained import model_fields

    fields: Dict[str, Any] = {}
    if args.insightface_config is not None:  # its batch_size is per process
        fields.update(train_fields(args.insightface_config, args.nproc or launched_world() or 1))
    if overrides.get("init") is not None:
        fields.update(model_fields(overrides["init"]))
    return fields


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


QUALITY_COLUMNS = f"""Expected input: face crops framed as the LFW-VLR face square (docs/lfw.md, "Finding the face"):
the face fills a square from the eyebrows' top to below the chin, eyes about 44 % down, centred;
on a 250 × 250 LFW image, rows 0.208-0.728 and columns 0.240-0.760. Any size (each is resized to
the model input; 8-250 px is what the models trained on), RGB or grayscale, read upright (EXIF
orientation applied). Crops far from square and folders whose mean face is off-centre or has its
eyes away from 44 % are warned about: the scores change with the framing.

Every file under --images is looked at (linked folders followed once): images are scored or
reported by name in the summary, other files are skipped and counted. A row depends on its image
alone (not on the batch or the folder).

CSV columns (one row per image):
  path          the image, relative to --images (its name's bytes as stored)
  xi_hat        REE checkpoints: the predicted recognizability index ξ̂ (the PRM output); higher is
                better; unbounded, regressed on [R] RI targets in [-2, 4] (the default form "sum",
                docs/spec.md §1.4)
  cr_fiqa       CR-FIQA checkpoints: the regressed certainty ratio (Boutros et al., CVPR 2023);
                higher is better; unbounded (targets cos_pos / (cos_neg + 1 + ε), mostly within [-1, 1])
  feature_norm  ‖v‖ of the unnormalised embedding, read as quality as MagFace does; higher is
                better; in (0, ∞), its scale set by the checkpoint
  ser_fiq       SER-FIQ (Terhörst et al., CVPR 2020): agreement of {SERFIQ_PASSES} embeddings with dropout on in
                the embedding layer, in (0, 1]; higher is meant as better, but on our small LFW-trained
                models it ranks resolution backwards (README, "Quality scores of your own crops")
  ers           REE checkpoints: 1 − cos to the centre of the unrecognizable instances, in [0, 2];
                higher is better
"""


def _command_quality(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .checkpoint import load_model
    from .devices import resolve_device
    from .quality import csv_header, model_scorer, score_folder

    if not args.images.is_dir():
        parser.error(f"--images {args.images} is not a directory")
    if args.batch_size <= 0:
        parser.error("--batch-size must be positive")
    device = resolve_device(args.device)
    trained = load_model(args.checkpoint, device)
    method = trained.config.method
    header = csv_header(method, trained.ui_center is not None)
    scorer = model_scorer(trained.model, method, trained.ui_center, SERFIQ_PASSES)
    run = score_folder(args.images, args.output, header, scorer, trained.model.input_size, args.batch_size)
    print(run.summary(), file=sys.stderr if run.failed or run.warnings else sys.stdout)
    if run.scored == 0:
        parser.error(f"--images {args.images} holds no readable image files")
    print(f"wrote {run.scored} rows -> {args.output}")
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

    run_demo(args.output, quick=args.quick, lfw=args.lfw, synthetic=args.synthetic, from_scratch=args.from_scratch)
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
