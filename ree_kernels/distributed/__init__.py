"""`arcface_head` with the prototypes sharded by class over torch.distributed ranks.

One concern per module: `group` (the ranks and which classes each holds), `checks` (arguments
that every rank accepts or every rank rejects), `op` (the forward and backward passes), `init`
(the seeded prototype init), `state` (checkpoints across world sizes). The module over them,
`ShardedArcFaceHead`, sits beside the one-process head in `ree_kernels.modules`.

Face recognition outgrows one device through its classifier (WebFace42M: about 2.06 million
identities); insightface's PartialFC answers by giving each rank a slice of the classes. This
package does the same on top of the fused head, with torch.distributed as the engine (gloo on
CPUs, NCCL on GPUs):

- Rank r of `world` holds the contiguous classes `shard_range(C, r, world)` and its own rows of
  the global batch (the row counts may differ between ranks).
- Forward: all-gather the embeddings and labels; one fused local pass over the shard (the
  kernel op `head_forward`, or its eager twin for the reference backend) where rows whose label
  lives on another shard count as ignored, so that they get the plain log-sum-exp and the
  nearest negative over every local class; then per row across ranks: log-sum-exp by an
  all-reduce of the max and one of the rescaled sums (the owner's local log-sum-exp holds the
  margin at the label, the others' do not: together the global one with the margin), cos_pos
  from the owning rank, the nearest negative as (value, global index), lowest index on ties.
- Backward: the local `head_backward` with the global log-sum-exp gives the shard's dW, which
  stays local, and the shard's part of the embedding gradient of the whole batch, which is
  summed over ranks by a reduce-scatter that leaves each rank its own rows.

Gradient convention. With reduction "mean" or "sum" the loss is ONE number, the reduction over
the global batch, bitwise the same on every rank, and every rank must backpropagate it with the
same factor (each calls `loss.backward()`). Then the prototype shard gets exactly its slice of
the single-process gradient. The embedding gradient is, by default (`embedding_grad="ddp"`),
world × the derivative of the loss with respect to this rank's rows: DistributedDataParallel
averages the backbone gradients over ranks, and the average of those is the single-process
backbone gradient, as in PartialFC. With `embedding_grad="exact"` it is the derivative itself;
average-free data parallelism (summing backbone gradients over ranks by hand) then gives the
single-process gradient. With reduction "none" each rank gets its own rows' weighted losses and
the objective is the sum over ranks of what each rank backpropagates; the same two conventions
hold for it. Keep the head out of DDP (its shards differ by rank and must not be averaged).
"""
from __future__ import annotations

from .checks import EMBEDDING_GRADS
from .group import shard_range
from .init import PROTOTYPE_INIT_BLOCK, PROTOTYPE_INIT_STD, init_prototypes
from .op import sharded_arcface_head
from .state import gather_shard, merge_state_dicts, shard_state_dict

__all__ = [
    "EMBEDDING_GRADS",
    "PROTOTYPE_INIT_BLOCK",
    "PROTOTYPE_INIT_STD",
    "gather_shard",
    "init_prototypes",
    "merge_state_dicts",
    "shard_range",
    "shard_state_dict",
    "sharded_arcface_head",
]
