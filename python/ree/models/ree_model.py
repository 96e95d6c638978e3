"""`REEModel`: backbone + embedding head + PRM + PAM, and the inference helpers."""
from __future__ import annotations

import copy
import hashlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from . import sface
from .heads import PAM, PRM, EmbeddingHead
from .iresnet import BACKBONES, IResNet, backbone_config

ARCHS = (*BACKBONES, "sface")
"""Every backbone `ModelConfig.arch` names: the iResNet layouts (`BACKBONES`) and SFace
(`ree.models.sface`, 112 × 112 input, 1024 × 7 × 7 feature map, 128-d embedding by default)."""

PRM_INPUTS = ("embedding", "normalized")
"""What the PRM reads: the embedding v, or v̂ = v / ‖v‖ (no access to the feature norm)."""
TRAINABLE = ("all", "last-stage")
"""What a run trains of the backbone: all of it, or only its last stage (with the embedding
layer, the PRM, the PAM and the prototypes), the rest frozen in eval mode."""


@dataclass(frozen=True)
class ModelConfig:
    """What `REEModel` is built from (saved in checkpoints, so a checkpoint rebuilds its model).

    `input_size` None means the arch's own (32 for "small", 112 for the iResNets and SFace,
    whose only size it is); `embedding_size` None means 512, or 128 for "small" (its last stage
    has 128 channels and a 512-d embedding only slows it on a CPU) and "sface" (its own).
    `prm_input` is what the PRM reads: the embedding v ("embedding", docs/spec.md §1.5) or
    v̂ = v/‖v‖ ("normalized", which hides the feature norm). `trainable`: "last-stage" freezes
    the backbone before its last stage (`prefix`), BatchNorm statistics included."""

    arch: str = "small"
    input_size: Optional[int] = None
    embedding_size: Optional[int] = None
    dropout: float = 0.0
    prm_dropout: float = 0.1
    prm_input: str = "embedding"
    pam_reduction: int = 16
    trainable: str = "all"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.arch == "sface":
            if self.input_size not in (None, sface.INPUT_SIZE):
                raise ValueError(f"input_size must be {sface.INPUT_SIZE} (or None) for arch 'sface', got "
                                 f"{self.input_size!r}")
        else:
            backbone_config(self.arch, self.input_size)  # validates input_size
        if self.embedding_size is not None and (not isinstance(self.embedding_size, int) or self.embedding_size <= 0):
            raise ValueError(f"embedding_size must be a positive int, got {self.embedding_size!r}")
        for name in ("dropout", "prm_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)!r}")
        if self.prm_input not in PRM_INPUTS:
            raise ValueError(f"prm_input must be 'embedding' or 'normalized', got {self.prm_input!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if not isinstance(self.pam_reduction, int) or self.pam_reduction <= 0:
            raise ValueError(f"pam_reduction must be a positive int, got {self.pam_reduction!r}")

    @property
    def resolved_input_size(self) -> int:
        if self.arch == "sface":
            return sface.INPUT_SIZE
        return backbone_config(self.arch, self.input_size).input_size

    @property
    def resolved_embedding_size(self) -> int:
        if self.embedding_size is not None:
            return self.embedding_size
        return 128 if self.arch in ("small", "sface") else 512

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class ModelOutput(NamedTuple):
    """`embedding` v [B, D] (not normalised), `feature_map` [B, C, h, w], `quality` ξ̂ [B]
    (the PRM output), `attn` v^attn [B, D] (the PAM output)."""

    embedding: torch.Tensor
    feature_map: torch.Tensor
    quality: torch.Tensor
    attn: torch.Tensor


class REEModel(nn.Module):
    """Images [B, 3, S, S] normalised as (x/255 − 0.5)/0.5 -> `ModelOutput`."""

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.config = config
        dim = config.resolved_embedding_size
        if config.arch == "sface":
            self.backbone: nn.Module = sface.SFaceBackbone()
            channels = sface.FEATURE_CHANNELS
            self.head = EmbeddingHead(channels, sface.FEATURE_SIZE, dim, config.dropout, eps=sface.HEAD_BN_EPS)
        else:
            layout = backbone_config(config.arch, config.input_size)
            self.backbone = IResNet(layout)
            channels = layout.feature_channels
            self.head = EmbeddingHead(channels, layout.feature_size, dim, config.dropout)
        self.prm = PRM(dim, config.prm_dropout)
        self.pam = PAM(channels, dim, reduction=config.pam_reduction)
        if config.trainable == "last-stage":
            for module in self.backbone.prefix_modules():
                module.requires_grad_(False)

    def train(self, mode: bool = True) -> "REEModel":
        super().train(mode)
        if self.config.trainable == "last-stage":  # a frozen prefix keeps its BatchNorm statistics
            for module in self.backbone.prefix_modules():
                module.eval()
        return self

    @property
    def input_size(self) -> int:
        return self.config.resolved_input_size

    @property
    def embedding_size(self) -> int:
        return self.head.fc.out_features

    def forward(self, images: torch.Tensor) -> ModelOutput:
        return self.forward_from_prefix(self.prefix(images))

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] -> the input of the backbone's last stage (`IResNet.prefix`,
        `SFaceBackbone.prefix`); without autograd when that part is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.trainable == "all"):
            return self.backbone.prefix(images)

    def forward_from_prefix(self, features: torch.Tensor) -> ModelOutput:
        """`prefix`'s output -> `ModelOutput`: what a run with a frozen prefix computes from
        features cached once (`ree.prefix_cache`)."""
        feature_map = self.backbone.last_stage(features)
        embedding = self.head(feature_map)
        prm_input = embedding if self.config.prm_input == "embedding" else nn.functional.normalize(embedding, dim=1)
        return ModelOutput(embedding, feature_map, self.prm(prm_input), self.pam(feature_map))


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode and autograd off for the block; its mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def inference_copy(model: REEModel) -> REEModel:
    """A copy of `model` for inference only (eval mode, no gradients): each BatchNorm of its
    backbone that follows a convolution is folded into it (`torch.nn.utils.fusion.
    fuse_conv_bn_eval`), and the backbone's weights are channels-last, so that its outputs are
    too. The same function up to float rounding (SFace: 2e-5 of features up to 6) and faster on
    CPUs, where depthwise convolutions are slow in the default layout: SFace's prefix 2.2
    times, its last stage 1.6 times on two cores. `model` itself is left as it is."""
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    for sequence in [m for m in fast.backbone.modules() if isinstance(m, nn.Sequential)]:
        for k in range(len(sequence) - 1):
            if isinstance(sequence[k], nn.Conv2d) and isinstance(sequence[k + 1], nn.BatchNorm2d):
                sequence[k] = fuse_conv_bn_eval(sequence[k], sequence[k + 1])
                sequence[k + 1] = nn.Identity()
    fast.backbone.to(memory_format=torch.channels_last)
    return fast


SERFIQ_DROPOUT = 0.5
"""The dropout rate of SER-FIQ's passes for a model trained without dropout (else its own rate)."""
SERFIQ_PASSES = 10
"""SER-FIQ's number of stochastic passes m where this package scores it (the paper uses 100)."""


class Inference(NamedTuple):
    """What `embed` returns, float32 on the CPU: `embeddings` [N, D] (flip-fused when asked),
    and of the image itself (unflipped): `plain` embeddings [N, D], `quality` ξ̂ [N] (the PRM
    output), the feature `norm` ‖v‖ [N], and `serfiq` [N] (SER-FIQ, or None when not asked)."""

    embeddings: torch.Tensor
    quality: torch.Tensor
    norm: torch.Tensor
    plain: torch.Tensor
    serfiq: Optional[torch.Tensor] = None


def serfiq_score(embeddings: torch.Tensor) -> torch.Tensor:
    """SER-FIQ's quality 2·sigmoid(−(2/m²)·Σ_{i<j} ‖x_i − x_j‖) of m stochastic embeddings
    [m, N, D] of N images, x normalised -> [N] in (0, 1], higher is better (Terhörst et al.,
    "SER-FIQ: Unsupervised Estimation of Face Image Quality Based on Stochastic Embedding
    Robustness", CVPR 2020)."""
    x = nn.functional.normalize(embeddings.double(), dim=2).transpose(0, 1)  # [N, m, D]
    m = x.shape[1]
    distances = torch.cdist(x, x).triu(diagonal=1).sum((1, 2))
    return (2.0 * torch.sigmoid(-(2.0 / m ** 2) * distances)).float()


def serfiq_keep(images: torch.Tensor, units: Tuple[int, ...], passes: int, dropout: float,
                seed: int = 0) -> torch.Tensor:
    """SER-FIQ's dropout masks, [passes, N, *units] bool (True: kept), drawn for each image from
    a generator seeded by its pixels and `seed`: an image's masks, hence its score, do not
    depend on the batch it comes in, its place there or the other images scored with it."""
    masks = []
    for image in images.detach().float().cpu():
        digest = hashlib.sha256(image.contiguous().numpy().tobytes() + seed.to_bytes(8, "little", signed=True))
        g = torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little") >> 1)
        masks.append(torch.rand((passes, *units), generator=g) >= dropout)
    return torch.stack(masks, 1)


def ers_score(plain: torch.Tensor, ui_center: torch.Tensor) -> torch.Tensor:
    """ERS = 1 − cos(v, ū): the cosine distance of unnormalised embeddings `plain` [..., D] to the
    UI centre ū [D] (the centre of the unrecognizable instances) -> [...], float32 on the CPU,
    in [0, 2], higher is better."""
    u = nn.functional.normalize(ui_center.float().cpu(), dim=0)
    return 1.0 - nn.functional.normalize(plain.float(), dim=-1) @ u


def embed(model: REEModel, images: torch.Tensor, flip: bool = True, batch_size: int = 256,
          serfiq_passes: int = 0, seed: int = 0, prefix: Optional[torch.Tensor] = None) -> Inference:
    """Runs `model` in eval mode over [N, 3, S, S] images in batches. With `flip`, the
    embedding is the sum of the image's and its horizontal mirror's (insightface's flip
    fusion); the quality and the norm come from the image itself. `serfiq_passes` > 0 adds
    SER-FIQ from that many passes of the embedding layer with dropout on (the model's rate, or
    SERFIQ_DROPOUT), its masks drawn for each image from its pixels and `seed` (`serfiq_keep`):
    every output row depends on its image alone, not on the batch.

    `prefix`: `model.prefix(images)` computed beforehand ([N, C, h, w], any float dtype), e.g.
    once for several models fine-tuned with the same frozen prefix; the model then runs from it
    (`forward_from_prefix`), and `images` only seed SER-FIQ's masks. Flip fusion would need the
    mirrored images' prefix too, so it is refused with `prefix`.

    Raises:
        ValueError: images not [N, 3, H, W], batch_size / serfiq_passes not positive ints, or a
            `prefix` with another number of rows, or given with flip.
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape [N, 3, H, W], got {tuple(images.shape)}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(serfiq_passes, int) or serfiq_passes < 0 or serfiq_passes == 1:
        raise ValueError(f"serfiq_passes must be 0 or an int >= 2, got {serfiq_passes!r}")
    if prefix is not None and (flip or prefix.shape[0] != images.shape[0]):
        raise ValueError(f"prefix must hold one row per image ({images.shape[0]}), got {prefix.shape[0]}, "
                         f"and needs flip=False (got {flip})")
    device = next(model.parameters()).device
    dropout = model.head.dropout.p or SERFIQ_DROPOUT
    parts: Dict[str, list] = {"embeddings": [], "plain": [], "quality": [], "serfiq": []}
    with evaluating(model):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size].to(device)
            if prefix is None:
                out = model(batch)
            else:
                out = model.forward_from_prefix(prefix[start:start + batch_size].to(device, torch.float32))
            emb = out.embedding.float()
            parts["plain"].append(emb.cpu())
            if flip:
                emb = emb + model(batch.flip(3)).embedding.float()
            parts["embeddings"].append(emb.cpu())
            parts["quality"].append(out.quality.float().cpu())
            if serfiq_passes:
                keep = serfiq_keep(batch, tuple(out.feature_map.shape[1:]), serfiq_passes, dropout,
                                   seed).to(device)
                parts["serfiq"].append(serfiq_score(model.head.dropout_passes(out.feature_map, keep, dropout).cpu()))
    if not parts["embeddings"]:
        empty = torch.empty(0, model.embedding_size)
        return Inference(empty, torch.empty(0), torch.empty(0), empty, torch.empty(0) if serfiq_passes else None)
    plain = torch.cat(parts["plain"])
    return Inference(torch.cat(parts["embeddings"]), torch.cat(parts["quality"]), plain.norm(dim=1), plain,
                     torch.cat(parts["serfiq"]) if serfiq_passes else None)
