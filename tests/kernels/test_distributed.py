"""The class-sharded head (ree_kernels.distributed) against the single-process `arcface_head`.

The multi-process tests spawn gloo process groups on the CPU (a file store in tmp_path, a
timeout on every collective, so a broken rank fails the test instead of hanging it). Each
spawned group runs many cases, since starting the processes costs more than the cases."""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Optional, Sequence

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ree_kernels import arcface_head, reference
from ree_kernels.backends import CPP_KERNELS, KERNEL_DTYPES, TRITON_USABLE
from ree_kernels.distributed import (
    init_prototypes,
    merge_state_dicts,
    shard_range,
    shard_state_dict,
    sharded_arcface_head,
)
from ree_kernels.modules import ShardedArcFaceHead
from spawned import spawn
from support import FORWARD_TOL, GRAD_TOL, check_nearest_negative, head_inputs, max_error, run_head

# The local passes the sharded head is tested with: its eager one, and the kernel ops of every
# backend that runs here (Triton in its interpreter; the C++ CPU head once built: the shared
# kernel suite, not this file, is what fails when the extension lacks it).
LOCAL_BACKENDS = ("reference",) + (("triton",) if TRITON_USABLE else ()) + (
    ("cpu",) if ("head", "CPU") in CPP_KERNELS else ())


def poison_outputs() -> None:
    """Unwritten output elements show up as NaN / INT_MAX (as conftest's poisoned_outputs does)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True


# --------------------------------------------------------------------------------------------
# One comparison case
# --------------------------------------------------------------------------------------------

def row_sizes(world: int, equal: bool) -> List[int]:
    """Rows per rank: different counts unless `equal`."""
    return [6] * world if equal else [5 + (3 * r) % 4 for r in range(world)]


def case_inputs(case: Dict, world: int) -> Dict:
    """The global batch of a case, the same on every rank (seeded), in float64."""
    classes, dim = case.get("classes", 31), case.get("dim", 13)
    batch = sum(row_sizes(world, case.get("equal", False)))
    # Planted rows at |cos| = 1 only below float64: there φ's sqrt(1 − cos²) turns a last-bit
    # difference of the cosine (a shard's matrix product has another shape than the full one)
    # into ~1e-7, beyond the float64 tolerance that pt = gt leaves.
    default_plant = () if case["dtype"] == torch.float64 else ("peaky", "opposite")
    inputs = head_inputs(batch, classes, dim, seed=case["seed"], dtype=torch.float64,
                         ignored=case.get("ignored", 0), weights=case.get("weights", False),
                         plant=case.get("plant", default_plant), ui_center=case.get("ui", True))
    labels = inputs["labels"]
    if case.get("edges"):  # the first and last class of every shard
        edges = [c for r in range(world) for c in (shard_range(classes, r, world)[0],
                                                    shard_range(classes, r, world)[1] - 1)]
        for i, c in enumerate(edges[: batch - 2 - case.get("ignored", 0)]):
            labels[2 + i] = c
    if case.get("ties"):
        # Rows along e_0 (scaled by powers of 2) and two prototypes 3·e_0, on the first and the last
        # shard: both cosines are exactly 1 whatever the summation order, the lowest index must win.
        inputs["embeddings"] = torch.zeros(batch, dim, dtype=torch.float64)
        inputs["embeddings"][:, 0] = 2.0 ** (torch.arange(batch) % 3 - 1)
        tied = (3, classes - 2)
        for c in tied:
            inputs["prototypes"][c] = 0.0
            inputs["prototypes"][c, 0] = 3.0
        labels[(labels == tied[0]) | (labels == tied[1])] = 0
    if "ignore_index" in case:  # a class id: the local label ignore_index must still be a target
        index, counted = case["ignore_index"], batch - case.get("ignored", 0)
        labels[labels == -100] = index
        labels[(labels == index) & (torch.arange(batch) < counted)] = 0
        for r in range(1, world):
            labels[counted - r] = shard_range(classes, r, world)[0] + index
    return inputs


def rows_of(out: reference.HeadOutput, rows: slice, reduction: str) -> reference.HeadOutput:
    return reference.HeadOutput(*(x if (name == "loss" and reduction != "none") else x[rows]
                                  for name, x in zip(out._fields, out)))


def objective(loss: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """What is backpropagated: the loss, or a weighted sum of the rows (as support.run_head)."""
    return loss if loss.dim() == 0 else (loss * weights).sum()


def grid_step(gt: torch.Tensor, dtype: torch.dtype) -> float:
    """The spacing of `dtype`'s numbers at the largest finite |gt|."""
    finite = gt.detach()[torch.isfinite(gt.detach())]
    if finite.numel() == 0:
        return 0.0
    top = finite.abs().max().to(dtype)
    return float(torch.nextafter(top, torch.tensor(math.inf, dtype=dtype)) - top)


def assert_spec_close_to_any(ours: torch.Tensor, pts: Sequence[torch.Tensor], gt: torch.Tensor, tol: float,
                             what: str) -> None:
    """docs/spec.md §5, max|ours − gt| ≤ 2·max|pt − gt| + tol, with the pt farthest from gt, plus
    one step of ours' dtype at |gt|. The sharded head sums the global batch in float64 and rounds
    once, so its loss is within a float32 step of the float64 sum of its rows; a "sum" loss of
    ~30 rows is ~650, where that step (6e-5) is larger than tol, and pt (summed in float32) can
    land on the float nearest gt by chance (2·|pt − gt| = 1.3e-5 for world 4's "reference sum
    product" case), which no float32 result can be required to match. For values of order 1
    the step is far below tol and changes nothing."""
    err = max_error(ours, gt, what)
    bound = 2 * max(max_error(pt, gt, what + " (pt)") for pt in pts) + tol + grid_step(gt, ours.dtype)
    assert err <= bound, (f"{what}: max|ours − gt| = {err:.3e} > 2·max|pt − gt| + tol + one {ours.dtype} step "
                          f"= {bound:.3e}")


def check_case(rank: int, world: int, case: Dict) -> None:
    dtype, backend = case["dtype"], case["backend"]
    reduction = case.get("reduction", "mean")
    options = {k: case[k] for k in ("margin_mode", "ri_form", "scale", "margin", "ignore_index") if k in case}
    inputs = case_inputs(case, world)
    classes = inputs["prototypes"].shape[0]
    sizes = row_sizes(world, case.get("equal", False))
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    start, stop = shard_range(classes, rank, world)

    emb = inputs["embeddings"][rows].to(dtype).requires_grad_(True)
    shard = inputs["prototypes"][start:stop].to(dtype).requires_grad_(True)
    weight = inputs["sample_weight"]
    ours = sharded_arcface_head(
        emb, shard, inputs["labels"][rows], None if inputs["ui_center"] is None else inputs["ui_center"].to(dtype),
        num_classes=classes, sample_weight=None if weight is None else weight[rows].to(dtype),
        reduction=reduction, backend=backend, embedding_grad=case.get("embedding_grad", "exact"), **options)
    row_weights = torch.linspace(0.5, 1.5, inputs["labels"].numel(), dtype=ours.loss.dtype)
    ours_g = torch.autograd.grad(objective(ours.loss, row_weights[rows]), (emb, shard))

    # pt: the single-process reference in dtype, and the same kernel single-process on the
    # global batch: sharding may add no error beyond what the local pass has on its own.
    pts = [run_head(inputs, backend=b, dtype=dtype, reduction=reduction, **options)
           for b in dict.fromkeys(("reference", backend))]
    gt, gt_g = run_head(inputs, backend="reference", dtype=torch.float64, reduction=reduction, **options)
    what = f"[rank {rank}/{world} {case['name']}]"
    assert ours.loss.dtype == reference.stat_dtype(dtype), what
    pt_rows, gt_rows = [rows_of(pt, rows, reduction) for pt, _ in pts], rows_of(gt, rows, reduction)
    for field in ("loss", "cos_pos", "cos_neg", "cos_ui", "ri", "lse"):
        assert_spec_close_to_any(getattr(ours, field), [getattr(p, field) for p in pt_rows], getattr(gt_rows, field),
                                 FORWARD_TOL[dtype], f"{what} {field}")
    check_nearest_negative(ours, gt_rows, {"embeddings": inputs["embeddings"][rows], "labels": inputs["labels"][rows],
                                           "prototypes": inputs["prototypes"]}, dtype)
    if dtype == torch.float64:  # neg_index is a global class id
        assert torch.equal(ours.neg_index, gt_rows.neg_index), f"{what} neg_index"
    if case.get("ties"):
        assert bool((ours.neg_index == 3).all()), f"{what} neg_index {ours.neg_index}, expected 3"
    scale_e = world if case.get("embedding_grad") == "ddp" else 1
    for name, o, p, g in (("grad embeddings", ours_g[0] / scale_e, [g[0][rows] for _, g in pts], gt_g[0][rows]),
                          ("grad prototypes", ours_g[1], [g[1][start:stop] for _, g in pts], gt_g[1][start:stop])):
        assert o.dtype == dtype, f"{what} {name} has dtype {o.dtype}"
        assert_spec_close_to_any(o, p, g, GRAD_TOL[dtype], f"{what} {name}")
    if reduction != "none":  # one number, bitwise the same on every rank
        losses = [torch.zeros_like(ours.loss) for _ in range(world)]
        dist.all_gather(losses, ours.loss.detach())
        assert all(torch.equal(x, losses[0]) for x in losses), f"{what} the ranks' losses differ: {losses}"


def comparison_cases(world: int) -> List[Dict]:
    cases = []
    for backend in LOCAL_BACKENDS:
        dtypes = [d for d in (torch.float64, torch.float32) if d in KERNEL_DTYPES[backend]]
        wide = dtypes[0]
        for k, mode in enumerate(reference.MARGIN_MODES):
            for dtype in dtypes:
                cases.append(dict(name=f"{backend} {mode} {dtype}", backend=backend, dtype=dtype, seed=100 + k,
                                  margin_mode=mode, ignored=3, weights=True, edges=True))
        for reduction in reference.REDUCTIONS:
            for form in reference.RI_FORMS:
                cases.append(dict(name=f"{backend} {reduction} {form}", backend=backend, dtype=torch.float32,
                                  seed=110, reduction=reduction, ri_form=form, ignored=2, weights=reduction != "sum",
                                  edges=True, scale=30.0, margin=0.3))
        cases += [
            # The zero row's gradient is ~1/eps = 1e12 (F.normalize): float32, where pt − gt leaves room
            # for the different summation order, as the single-process suite does.
            dict(name=f"{backend} equal rows, no ui_center", backend=backend, dtype=torch.float32, seed=120,
                 equal=True, ui=False, plant=("peaky", "opposite", "zero_row")),
            dict(name=f"{backend} ties across shards", backend=backend, dtype=wide, seed=121, ties=True, plant=()),
            dict(name=f"{backend} one class per rank", backend=backend, dtype=wide, seed=122,
                 classes=world, ignored=1),
            dict(name=f"{backend} all rows ignored", backend=backend, dtype=torch.float32, seed=123,
                 ignored=sum(row_sizes(world, False))),
            dict(name=f"{backend} non-negative ignore_index", backend=backend, dtype=wide, seed=124,
                 ignore_index=2, ignored=2, edges=True),
            dict(name=f"{backend} ddp convention", backend=backend, dtype=wide, seed=125,
                 embedding_grad="ddp", weights=True, edges=True),
            dict(name=f"{backend} bfloat16", backend=backend, dtype=torch.bfloat16, seed=126, ignored=2,
                 weights=True, edges=True),
        ]
    return cases


def comparison_worker(rank: int, world: int) -> None:
    for case in comparison_cases(world):
        check_case(rank, world, case)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_head_matches_single_process(tmp_path, world):
    spawn(comparison_worker, world, tmp_path, setup=poison_outputs)


def test_without_torch_distributed_is_one_rank():
    assert not dist.is_initialized()
    for case in comparison_cases(1)[:2]:
        inputs = case_inputs(case, 1)
        emb = inputs["embeddings"].clone().requires_grad_(True)
        protos = inputs["prototypes"].clone().requires_grad_(True)
        ours = sharded_arcface_head(emb, protos, inputs["labels"], inputs["ui_center"],
                                    num_classes=protos.shape[0], sample_weight=inputs["sample_weight"],
                                    margin_mode=case["margin_mode"])
        ref = arcface_head(emb, protos, inputs["labels"], inputs["ui_center"],
                           sample_weight=inputs["sample_weight"], margin_mode=case["margin_mode"])
        for field in ref._fields:
            torch.testing.assert_close(getattr(ours, field), getattr(ref, field), equal_nan=True, rtol=0, atol=1e-12)
        ours_g = torch.autograd.grad(ours.loss, (emb, protos))
        ref_g = torch.autograd.grad(ref.loss, (emb, protos))
        for o, r in zip(ours_g, ref_g):
            torch.testing.assert_close(o, r, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Training: the gradient convention end to end
# --------------------------------------------------------------------------------------------

TRAIN = dict(classes=11, in_dim=16, dim=8, steps=3, seed=3, lr=0.5, momentum=0.9)


def train_batches(world: int):
    """Per step: the global batch (x, y) and each rank's rows (different counts)."""
    sizes = [5 + 2 * r for r in range(world)]
    g = torch.Generator().manual_seed(7)
    for _ in range(TRAIN["steps"]):
        x = torch.randn(sum(sizes), TRAIN["in_dim"], generator=g, dtype=torch.float64)
        y = torch.randint(0, TRAIN["classes"], (sum(sizes),), generator=g)
        y[-1] = -100
        yield x, y, [slice(sum(sizes[:r]), sum(sizes[: r + 1])) for r in range(world)]


def make_backbone() -> nn.Linear:
    torch.manual_seed(TRAIN["seed"])
    return nn.Linear(TRAIN["in_dim"], TRAIN["dim"], dtype=torch.float64)


def sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=TRAIN["lr"], momentum=TRAIN["momentum"])


def train_single_process():
    """The same training in one process: the full prototypes and arcface_head on the global batch."""
    backbone = make_backbone()
    weight = nn.Parameter(init_prototypes(TRAIN["classes"], TRAIN["dim"], seed=TRAIN["seed"], dtype=torch.float64))
    opt = sgd([*backbone.parameters(), weight])
    for x, y, _ in train_batches(dist.get_world_size()):
        arcface_head(backbone(x), weight, y, backend="reference").loss.backward()
        opt.step()
        opt.zero_grad()
    return backbone, weight


def train_sharded(rank: int, world: int, embedding_grad: str):
    """DDP over the backbone with the default convention; by hand (summed gradients) with "exact"."""
    backbone = make_backbone()
    head = ShardedArcFaceHead(TRAIN["dim"], TRAIN["classes"], seed=TRAIN["seed"], dtype=torch.float64,
                              backend="reference", embedding_grad=embedding_grad)
    model = nn.parallel.DistributedDataParallel(backbone) if embedding_grad == "ddp" else backbone
    opt = sgd([*model.parameters(), *head.parameters()])
    for x, y, rows in train_batches(world):
        head(model(x[rows[rank]]), y[rows[rank]]).backward()
        if embedding_grad == "exact":
            for p in backbone.parameters():
                dist.all_reduce(p.grad)
        opt.step()
        opt.zero_grad()
    return backbone, head


def train_worker(rank: int, world: int, out_dir: str) -> None:
    ref_backbone, ref_weight = train_single_process()
    start, stop = shard_range(TRAIN["classes"], rank, world)
    for convention in ("ddp", "exact"):
        backbone, head = train_sharded(rank, world, convention)
        for name, p in backbone.named_parameters():
            torch.testing.assert_close(p, ref_backbone.get_parameter(name), rtol=0, atol=1e-12,
                                       msg=lambda m, c=convention, n=name: f"{c}: backbone {n}: {m}")
        torch.testing.assert_close(head.weight, ref_weight[start:stop], rtol=0, atol=1e-12,
                                   msg=lambda m, c=convention: f"{c}: prototype shard: {m}")
        assert not torch.equal(head.weight, init_prototypes(TRAIN["classes"], TRAIN["dim"], start, stop,
                                                            seed=TRAIN["seed"], dtype=torch.float64))
    # Checkpoints for the 2 -> 3 re-shard test: each rank's shard, and the gathered full one.
    torch.save(head.state_dict(), os.path.join(out_dir, f"shard{rank}.pt"))
    full = head.gather_state_dict(dst=0)
    assert (full is None) == (rank != 0)
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "full.pt"))
        torch.testing.assert_close(full["weight"], ref_weight.detach(), rtol=0, atol=1e-12)


def reshard_worker(rank: int, world: int, out_dir: str, old_world: int) -> None:
    shards = [torch.load(os.path.join(out_dir, f"shard{r}.pt")) for r in range(old_world)]
    full = merge_state_dicts(shards)
    assert torch.equal(full["weight"], torch.load(os.path.join(out_dir, "full.pt"))["weight"])
    head = ShardedArcFaceHead(TRAIN["dim"], TRAIN["classes"], seed=99, dtype=torch.float64, backend="reference",
                              embedding_grad="exact")
    with pytest.raises(ValueError, match=r"re-shard it"):
        head.load_state_dict(shards[min(rank, old_world - 1)])
    head.load_state_dict(shard_state_dict(full, rank, world))
    start, stop = shard_range(TRAIN["classes"], rank, world)
    assert torch.equal(head.weight.detach(), full["weight"][start:stop])
    assert torch.equal(head.gather_state_dict(dst=None)["weight"], full["weight"])

    x, y, rows = next(train_batches(world))
    emb = x[:, : TRAIN["dim"]].clone().requires_grad_(True)
    out = head(emb[rows[rank]], y[rows[rank]], return_stats=True)
    grads = torch.autograd.grad(out.loss, (emb, head.weight))
    weight = full["weight"].clone().requires_grad_(True)
    ref = arcface_head(emb, weight, y, backend="reference")
    ref_grads = torch.autograd.grad(ref.loss, (emb, weight))
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[0][rows[rank]], ref_grads[0][rows[rank]], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[1], ref_grads[1][start:stop], rtol=0, atol=1e-12)


def test_two_process_training_equals_one_process_and_reshards_to_three(tmp_path):
    spawn(train_worker, 2, tmp_path, str(tmp_path), setup=poison_outputs)
    spawn(reshard_worker, 3, tmp_path, str(tmp_path), 2, setup=poison_outputs)


# --------------------------------------------------------------------------------------------
# Errors: raised on every rank, never a hang
# --------------------------------------------------------------------------------------------

def error_cases(rank: int) -> List[tuple]:
    """(what differs, keyword overrides for this rank, expected error on this rank, message pattern)."""
    other = rank == 1
    return [
        ("D", dict(dim=5 if other else 6), ValueError, r"D \(embeddings.shape\[1\]\) differs across ranks"),
        ("num_classes", dict(classes=32 if other else 31), ValueError, r"num_classes differs across ranks"),
        ("dtype", dict(dtype=torch.float32 if other else torch.float64), ValueError, r"dtype differs"),
        ("margin", dict(margin=0.4 if other else 0.5), ValueError, r"margin differs"),
        ("reduction", dict(reduction="sum" if other else "mean"), ValueError, r"reduction differs"),
        ("sample_weight", dict(weights=other), ValueError, r"sample_weight given differs"),
        ("shard rows", dict(shard_rows=1 if other else 0), ValueError,
         r"prototype_shard has 14 rows, but rank 1 of 2 holds the classes \[16, 31\) of num_classes=31: 15"
         if other else r"rank 1 of 2 rejected its arguments \(ValueError: prototype_shard has 14 rows"),
        ("label range", dict(bad_label=not other), ValueError,
         r"labels must lie in \[0, 31\)" if not other else r"rank 0 of 2 rejected its arguments"),
        ("embeddings type", dict(not_a_tensor=other), TypeError if other else ValueError,
         r"embeddings must be a torch.Tensor" if other else r"rank 1 of 2 rejected its arguments \(TypeError"),
    ]


def call_with(rank: int, world: int, classes: int = 31, dim: int = 6, dtype=torch.float64, margin: float = 0.5,
              reduction: str = "mean", weights: bool = False, shard_rows: int = 0, bad_label: bool = False,
              not_a_tensor: bool = False):
    start, stop = shard_range(classes, rank, world)
    g = torch.Generator().manual_seed(rank)
    emb = torch.randn(4, dim, generator=g, dtype=dtype)
    labels = torch.tensor([0, 30, 15, 16])
    if bad_label:
        labels[1] = 31
    shard = torch.randn(stop - start - shard_rows, dim, generator=g, dtype=dtype)
    return sharded_arcface_head([[0.0]] if not_a_tensor else emb, shard, labels, num_classes=classes,
                                margin=margin, reduction=reduction, backend="reference",
                                sample_weight=torch.ones(4, dtype=dtype) if weights else None)


def error_worker(rank: int, world: int) -> None:
    for what, overrides, error, pattern in error_cases(rank):
        try:
            call_with(rank, world, **overrides)
        except error as err:
            assert re.search(pattern, str(err)), f"{what}: rank {rank} raised {err!r}, expected /{pattern}/"
        else:
            raise AssertionError(f"{what}: rank {rank} raised nothing")
        call_with(rank, world)  # every rank still takes part in the next collective


def test_mismatches_raise_on_every_rank(tmp_path):
    spawn(error_worker, 2, tmp_path, setup=poison_outputs)


# --------------------------------------------------------------------------------------------
# Single-process pieces
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [1, 4, 7, 31, 1031])
def test_shard_range_tiles_the_classes_by_the_split_rule(classes):
    for world in range(1, min(classes, 9) + 1):
        ranges = [shard_range(classes, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert [stop - start for start, stop in ranges] == [classes // world + (r < classes % world)
                                                           for r in range(world)]


@pytest.mark.parametrize("args, error, pattern", [
    ((10, 2, 2), ValueError, r"rank must lie in \[0, world=2\)"),
    ((10, -1, 2), ValueError, r"rank must lie"),
    ((10, 0, 0), ValueError, r"world must be at least 1"),
    ((3, 0, 4), ValueError, r"num_classes=3 is smaller than the world size 4"),
    ((10.0, 0, 1), TypeError, r"num_classes must be an int"),
])
def test_shard_range_rejects_bad_arguments(args, error, pattern):
    with pytest.raises(error, match=pattern):
        shard_range(*args)


def test_single_process_argument_errors():
    emb, protos, labels = torch.randn(4, 6), torch.randn(9, 6), torch.tensor([0, 8, 3, -100])
    with pytest.raises(ValueError, match="prototype_shard has 9 rows"):
        sharded_arcface_head(emb, protos, labels, num_classes=10)
    with pytest.raises(ValueError, match="embedding_grad must be one of"):
        sharded_arcface_head(emb, protos, labels, num_classes=9, embedding_grad="mean")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 8\)"):
        sharded_arcface_head(emb, protos[:8], labels, num_classes=8)
    with pytest.raises(ValueError, match="chunk_size"):
        sharded_arcface_head(emb, protos, labels, num_classes=9, chunk_size=-1)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        sharded_arcface_head(emb, protos, labels, num_classes=9, process_group=object())


def test_init_is_the_same_for_every_world_size():
    classes, dim = 40000, 3  # more than two init blocks
    full = init_prototypes(classes, dim, seed=5)
    assert full.shape == (classes, dim) and abs(float(full.std()) - 0.01) < 1e-3
    for world in (2, 3, 7):
        parts = [init_prototypes(classes, dim, *shard_range(classes, r, world), seed=5) for r in range(world)]
        assert torch.equal(torch.cat(parts), full)
    assert not torch.equal(init_prototypes(classes, dim, seed=6), full)
    assert torch.equal(init_prototypes(classes + 5, dim, seed=5)[:classes], full)


def test_state_dict_records_the_range_and_reshards():
    head = ShardedArcFaceHead(4, 23, seed=1)
    full = head.state_dict()
    assert full["_extra_state"] == {"num_classes": 23, "class_start": 0, "class_stop": 23}
    for world in (2, 3, 5):
        shards = [shard_state_dict(full, r, world) for r in range(world)]
        assert [s["weight"].shape[0] for s in shards] == [23 // world + (r < 23 % world) for r in range(world)]
        merged = merge_state_dicts(shards[::-1])
        assert torch.equal(merged["weight"], full["weight"]) and merged["_extra_state"] == full["_extra_state"]
        with pytest.raises(ValueError, match="re-shard it"):
            head.load_state_dict(shards[0])
        with pytest.raises(ValueError, match="gap or overlap"):
            merge_state_dicts(shards[1:])
        with pytest.raises(ValueError, match="not all of them"):
            shard_state_dict(shards[0], 0, 2)
    with pytest.raises(ValueError, match=r"cover \[0, 12\)"):
        merge_state_dicts([shard_state_dict(full, 0, 2)])
    head.load_state_dict(merge_state_dicts([shard_state_dict(full, r, 4) for r in range(4)]))
    assert head.gather_state_dict()["weight"].shape == (23, 4)


def test_module_keeps_float32_weights_under_low_precision_embeddings():
    head = ShardedArcFaceHead(6, 9, seed=2)
    assert head.weight.dtype == torch.float32 and head.weight.shape == (9, 6)
    emb = torch.randn(5, 6, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).requires_grad_(True)
    labels = torch.tensor([0, 8, 3, -100, 4])
    out = head(emb, labels, reduction="none", return_stats=True)
    ref = arcface_head(emb, head.weight.detach().to(torch.bfloat16), labels, reduction="none")
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.sum().backward()
    assert head.weight.grad.dtype == torch.float32 and emb.grad.dtype == torch.bfloat16
    assert float(head.weight.grad.abs().max()) > 0


def test_local_pass_ignores_autocast_like_the_kernels():
    inputs = head_inputs(9, 13, 6, seed=3, dtype=torch.float32)
    args = (inputs["embeddings"], inputs["prototypes"], inputs["labels"])
    plain = sharded_arcface_head(*args, num_classes=13, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = sharded_arcface_head(*args, num_classes=13, backend="reference")
    for field in plain._fields:
        torch.testing.assert_close(getattr(autocast, field), getattr(plain, field), equal_nan=True, rtol=0, atol=0)
