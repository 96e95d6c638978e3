"""PartialFC sampling on the class-sharded head: at 2 gloo processes, `ShardedArcFaceHead(sample_rate=r)`
equals the single-process head on the same global batch over the union of the shards' sampled
classes, and the sampled set of each shard is its classes among the global labels plus others."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ree_kernels import arcface_head
from ree_kernels.distributed import init_prototypes, shard_range
from ree_kernels.modules import ShardedArcFaceHead
from spawned import spawn
from support import FORWARD_TOL, GRAD_TOL, assert_spec_close, head_inputs
from test_distributed import LOCAL_BACKENDS, poison_outputs

CLASSES, DIM, ROWS = 41, 13, (7, 5)


def sampled_worker(rank: int, world: int) -> None:
    start, stop = shard_range(CLASSES, rank, world)
    rows = slice(sum(ROWS[:rank]), sum(ROWS[: rank + 1]))
    for k, backend in enumerate(LOCAL_BACKENDS):
        for dtype in (torch.float64, torch.float32) if backend != "triton" else (torch.float32,):
            inputs = head_inputs(sum(ROWS), CLASSES, DIM, seed=200 + k, dtype=torch.float64, ignored=2,
                                 plant=("opposite",))
            labels = inputs["labels"]
            for r in range(world):  # every shard's first and last class
                first, last = shard_range(CLASSES, r, world)
                labels[2 + 2 * r], labels[3 + 2 * r] = first, last - 1
            head = ShardedArcFaceHead(DIM, CLASSES, seed=5, backend=backend, sample_rate=0.25,
                                      generator=torch.Generator().manual_seed(rank), dtype=dtype)
            emb = inputs["embeddings"][rows].to(dtype).clone().requires_grad_(True)
            out = head(emb, labels[rows], return_stats=True, reduction="sum")
            out.loss.backward()
            what = f"[rank {rank} {backend} {dtype}]"

            mine = head.sampled_classes
            owned = labels[(labels >= start) & (labels < stop)]
            assert mine.numel() == max(math.ceil(0.25 * (stop - start)), owned.unique().numel()), what
            assert set(owned.tolist()) <= set(mine.tolist()), what
            assert bool(((mine >= start) & (mine < stop)).all()), what
            outside = torch.ones(stop - start, dtype=torch.bool)
            outside[mine - start] = False
            assert bool((head.weight.grad[outside] == 0).all()), f"{what} an unsampled row got a gradient"

            # The single-process head on the global batch over the union of the sampled sets.
            sets = [None] * world
            dist.all_gather_object(sets, mine)
            union = torch.cat(sets)
            position = torch.full((CLASSES,), -1, dtype=torch.int64)
            position[union] = torch.arange(union.numel())
            global_labels = torch.where(labels >= 0, position[labels.clamp_min(0)], labels)
            full = init_prototypes(CLASSES, DIM, seed=5, dtype=dtype).requires_grad_(True)
            emb_all = inputs["embeddings"].to(dtype).clone().requires_grad_(True)
            ref = arcface_head(emb_all, full, global_labels, backend=backend, reduction="sum", class_index=union)
            ref.loss.backward()
            gt_full = init_prototypes(CLASSES, DIM, seed=5, dtype=torch.float64).requires_grad_(True)
            gt_emb = inputs["embeddings"].clone().requires_grad_(True)
            gt = arcface_head(gt_emb, gt_full, global_labels, backend="reference", reduction="sum",
                              class_index=union)
            gt.loss.backward()
            assert_spec_close(out.loss, ref.loss, gt.loss, FORWARD_TOL[dtype] * 10, f"{what} loss")
            assert_spec_close(out.cos_pos, ref.cos_pos[rows], gt.cos_pos[rows], FORWARD_TOL[dtype], f"{what} cos_pos")
            assert_spec_close(out.cos_neg, ref.cos_neg[rows], gt.cos_neg[rows], FORWARD_TOL[dtype], f"{what} cos_neg")
            if dtype == torch.float64:  # neg_index: a global class id
                assert torch.equal(out.neg_index, union[gt.neg_index[rows]]), what
            # The "ddp" convention: the embedding gradient is the world's share times world.
            assert_spec_close(emb.grad / world, emb_all.grad[rows], gt_emb.grad[rows], GRAD_TOL[dtype],
                              f"{what} grad embeddings")
            assert_spec_close(head.weight.grad, full.grad[start:stop], gt_full.grad[start:stop], GRAD_TOL[dtype],
                              f"{what} grad prototypes")


def test_sharded_sampled_head_equals_the_single_process_one(tmp_path):
    spawn(sampled_worker, 2, tmp_path, setup=poison_outputs)
