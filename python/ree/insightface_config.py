"""insightface arcface_torch config files (its `configs/*.py`) read as `TrainConfig` fields,
without executing them (`ree train --insightface-config FILE`).

Such a file is Python: `from easydict import EasyDict as edict`, `config = edict()`, then
`config.<name> = <value>` lines. Only that is read (with `ast`, nothing is run): every other
statement is refused, naming its line. A value is a literal (`ast.literal_eval`), or the
arithmetic (+ − × / // and unary minus) of numbers and of `config.<name>` values set above, as
in 18 of arcface_torch's 43 published configs (`config.warmup_epoch = config.num_epoch // 10`,
`config.num_classes = 30 * 10000`). arcface_torch
lays its job file over `configs/base.py`; the keys mapped here take base.py's values where the
file leaves them out (`BASE`).

The mapping (docs/pretrained.md):
- `network` r18 / r34 / r50 / r100 -> `arch` (arcface_torch's iResNets; others are refused);
- `embedding_size`, `lr`, `weight_decay`, `momentum`, `optimizer` (sgd, adamw), `seed`: as they are;
- `margin_list` (m1, m2, m3), arcface_torch's CombinedMarginLoss cos(m1·θ + m2) − m3 at s = 64:
  (1, m, 0) -> ArcFace, `margin_mode="arcface_st"` (its margin taken without gradient, as
  arcface_torch computes it), `margin=m`; (1, 0, m) -> CosFace, `margin_mode="cosface"`;
  m1 ≠ 1 or m2, m3 both non-zero are refused (our head has no such margin);
- `sample_rate` -> `sample_rate` (PartialFC's class sampling; see TrainConfig);
- `batch_size` is per GPU in arcface_torch: -> `batch_size` = batch_size × processes (our global batch);
- `num_epoch`, `warmup_epoch` -> `steps`, `warmup_steps` as arcface_torch counts them:
  num_image // global batch × epochs (so `num_image`, the size of the set the file was written
  for, is needed: give --steps for another set);
- bookkeeping, data and logging keys (`IGNORED`) are accepted and not used; `gradient_acc` must
  be 1 and `interclass_filtering_threshold` 0; any other key is refused.
"""
from __future__ import annotations

import ast
import operator
import os
from pathlib import Path
from typing import Any, Dict, Tuple

from .errors import ConfigError
from .models.arcface_torch import ARCFACE_TORCH_ARCHS

BASE: Dict[str, Any] = {"network": "r50", "embedding_size": 512, "margin_list": (1.0, 0.5, 0.0), "sample_rate": 1.0,
                        "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                        "seed": 2048, "warmup_epoch": 0, "gradient_acc": 1, "interclass_filtering_threshold": 0}
"""arcface_torch's configs/base.py values of the keys mapped here."""

IGNORED = frozenset({
    "resume", "save_all_states", "output", "fp16", "verbose", "frequent", "dali", "dali_aug", "num_workers",
    "rec", "num_classes", "num_image", "val_targets", "wandb_key", "suffix_run_name", "using_wandb",
    "wandb_entity", "wandb_project", "wandb_log_all", "save_artifacts", "wandb_resume",
})
"""Keys that set arcface_torch's bookkeeping, data, precision (`fp16`: ours is --amp) and logging."""

MAPPED = frozenset(BASE) | {"num_epoch"}


class InsightfaceConfigError(ConfigError):
    """The file cannot be read, or holds something this mapping refuses (the message names it)."""


def read_assignments(path: str | os.PathLike) -> Dict[str, Tuple[Any, int]]:
    """{name: (value, line)} of the file's `config.<name> = <value>` lines, without running it.

    Raises:
        InsightfaceConfigError: unreadable, not Python, or a statement other than the easydict
            import, `config = edict()` and assignments to `config.<name>` of a literal or of
            arithmetic on numbers and config values set above (named by line).
    """
    try:
        text = Path(path).read_text()
        tree = ast.parse(text, filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as err:
        raise InsightfaceConfigError(f"cannot read insightface config {path}: {err}") from err
    values: Dict[str, Tuple[Any, int]] = {}
    for stmt in tree.body:
        where = f"{path}:{stmt.lineno}"
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "easydict" and \
                [(a.name, a.asname) for a in stmt.names] == [("EasyDict", "edict")]:
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            continue  # a docstring
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
            if isinstance(target, ast.Name) and target.id == "config" and isinstance(value, ast.Call) and \
                    isinstance(value.func, ast.Name) and value.func.id == "edict" and not value.args and \
                    not value.keywords:
                continue
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and \
                    target.value.id == "config":
                try:
                    values[target.attr] = (_value(value, values), stmt.lineno)
                except (ValueError, TypeError, ZeroDivisionError) as err:
                    raise InsightfaceConfigError(
                        f"{where}: config.{target.attr} = {ast.unparse(value)!r} is not read: only literals and the "
                        f"arithmetic of numbers and config values set above are ({err})") from err
                continue
        raise InsightfaceConfigError(f"{where}: only `config.<name> = <value>` lines (and the easydict import, "
                                     f"`config = edict()`) are read; refused: {ast.unparse(stmt)[:100]!r}")
    return values


_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv}


def _value(node: ast.expr, values: Dict[str, Tuple[Any, int]]) -> Any:
    """The value of expression `node` by walking its tree: a literal, a `config.<name>` set above,
    or +, −, ×, /, // and unary minus of numbers."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "config":
        if node.attr not in values:
            raise ValueError(f"config.{node.attr} is not set above")
        return values[node.attr][0]
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _value(node.left, values), _value(node.right, values)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (left, right)):
            raise TypeError("arithmetic is read on numbers only")
        return _ARITHMETIC[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        operand = _value(node.operand, values)
        if not isinstance(operand, (int, float)) or isinstance(operand, bool):
            raise TypeError("arithmetic is read on numbers only")
        return -operand
    return ast.literal_eval(node)


def train_fields(path: str | os.PathLike, processes: int = 1) -> Dict[str, Any]:
    """The `TrainConfig` fields of arcface_torch config file `path` for a run in `processes`
    processes (see the module doc for the mapping).

    Raises:
        InsightfaceConfigError: naming the file, the line and the key that cannot be mapped.
    """
    assigned = read_assignments(path)

    def get(name: str) -> Any:
        return assigned[name][0] if name in assigned else BASE[name]

    def refuse(name: str, why: str) -> InsightfaceConfigError:
        line = f":{assigned[name][1]}" if name in assigned else " (configs/base.py's value)"
        return InsightfaceConfigError(f"{path}{line}: config.{name} = {get(name)!r}: {why}")

    for name in assigned:
        if name not in MAPPED and name not in IGNORED:
            raise refuse(name, "an arcface_torch key this mapping does not know")
    network = get("network")
    if network not in ARCFACE_TORCH_ARCHS:
        raise refuse("network", f"only arcface_torch's iResNets {', '.join(ARCFACE_TORCH_ARCHS)} map onto ree's "
                                "backbones")
    fields: Dict[str, Any] = {"arch": network, "input_size": None, "embedding_size": get("embedding_size")}
    fields.update(_margin(get("margin_list"), refuse))
    for name in ("gradient_acc", "interclass_filtering_threshold"):
        if get(name) != BASE[name]:
            raise refuse(name, f"not supported (only {BASE[name]!r})")
    batch = get("batch_size")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise refuse("batch_size", "must be a positive int (images per GPU)")
    fields["batch_size"] = batch * processes
    for ours, theirs in (("sample_rate", "sample_rate"), ("lr", "lr"), ("weight_decay", "weight_decay"),
                         ("momentum", "momentum"), ("optimizer", "optimizer"), ("seed", "seed")):
        fields[ours] = get(theirs)
    if isinstance(fields["sample_rate"], int) and not isinstance(fields["sample_rate"], bool):
        fields["sample_rate"] = float(fields["sample_rate"])
    if "num_epoch" in assigned or get("warmup_epoch"):
        name = "num_epoch" if "num_epoch" in assigned else "warmup_epoch"
        image_count = assigned.get("num_image", (None, 0))[0]
        if not isinstance(image_count, int) or image_count <= 0:
            raise refuse(name, "epochs become steps through config.num_image (the training set's size), which "
                               "the file does not give; set --steps instead")
        per_epoch = image_count // fields["batch_size"]
        if "num_epoch" in assigned:
            fields["steps"] = per_epoch * get("num_epoch")
        fields["warmup_steps"] = per_epoch * get("warmup_epoch")
    return fields


def _margin(margins: Any, refuse: Any) -> Dict[str, Any]:
    if not isinstance(margins, (tuple, list)) or len(margins) != 3 or \
            not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in margins):
        raise refuse("margin_list", "must be three numbers (m1, m2, m3)")
    m1, m2, m3 = (float(m) for m in margins)
    if m1 != 1.0:
        raise refuse("margin_list", "a multiplicative angular margin m1 != 1 (SphereFace) is not in ree's head")
    if m2 and m3:
        raise refuse("margin_list", "the combined margin (m2 and m3 both non-zero) is not in ree's head, which "
                                    "does ArcFace (1, m, 0) or CosFace (1, 0, m)")
    if m3:
        return {"margin_mode": "cosface", "margin": m3}
    return {"margin_mode": "arcface_st", "margin": m2}
