"""iResNet backbones (the ArcFace family's "improved ResNet"), from a small CPU variant to iResNet-50.

One implementation, configured by stage depths and widths: `iresnet_small` (32×32 input, three
narrow stages: trains on two CPU cores) and `iresnet50` (112×112, the insightface layout:
stages 3-4-14-3 at 64-128-256-512 channels) are two `BackboneConfig`s of the same network.
The backbone ends at the last feature map (insightface's network up to layer4); the embedding
head (models/heads.py) turns it into the embedding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn

BN_EPS = 1e-5


@dataclass(frozen=True)
class BackboneConfig:
    """An iResNet layout: `layers[i]` blocks of `widths[i]` channels in stage i, each stage
    halving the resolution, after a stride-1 3×3 stem of `stem_width` channels."""

    layers: Tuple[int, ...]
    widths: Tuple[int, ...]
    stem_width: int
    input_size: int

    def __post_init__(self) -> None:
        if len(self.layers) == 0 or len(self.layers) != len(self.widths):
            raise ValueError(f"layers and widths must be non-empty and of equal length, "
                             f"got {self.layers}, {self.widths}")
        if any(n <= 0 for n in self.layers) or any(w <= 0 for w in self.widths) or self.stem_width <= 0:
            raise ValueError("layers, widths and stem_width must be positive")
        stride = 2 ** len(self.layers)
        if self.input_size < stride or self.input_size % stride:
            raise ValueError(f"input_size must be a positive multiple of {stride} for {len(self.layers)} stages, "
                             f"got {self.input_size}")

    @property
    def feature_size(self) -> int:
        """Side of the last feature map."""
        return self.input_size // 2 ** len(self.layers)

    @property
    def feature_channels(self) -> int:
        return self.widths[-1]


BACKBONES = {
    "small": BackboneConfig(layers=(1, 2, 2), widths=(32, 64, 128), stem_width=32, input_size=32),
    "r18": BackboneConfig(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_width=64, input_size=112),
    "r34": BackboneConfig(layers=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem_width=64, input_size=112),
    "r50": BackboneConfig(layers=(3, 4, 14, 3), widths=(64, 128, 256, 512), stem_width=64, input_size=112),
    "r100": BackboneConfig(layers=(3, 13, 30, 3), widths=(64, 128, 256, 512), stem_width=64, input_size=112),
}
"""Named layouts. "small" is this project's CPU variant; the others are insightface's."""


def backbone_config(arch: str, input_size: int | None = None) -> BackboneConfig:
    """The named layout, optionally at another input size (a multiple of 2^stages)."""
    if arch not in BACKBONES:
        raise ValueError(f"arch must be one of {tuple(BACKBONES)}, got {arch!r}")
    base = BACKBONES[arch]
    if input_size is None:
        return base
    return BackboneConfig(base.layers, base.widths, base.stem_width, input_size)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block of iResNet: BN, conv, BN, PReLU, strided conv, BN."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels, eps=BN_EPS),
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels, eps=BN_EPS),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels, eps=BN_EPS),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class IResNet(nn.Module):
    """Images [B, 3, S, S] -> the last feature map [B, widths[-1], S/2^k, S/2^k] (k stages)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = nn.Sequential(
            nn.Conv2d(3, config.stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(config.stem_width, eps=BN_EPS),
            nn.PReLU(config.stem_width),
        )
        stages = []
        in_channels = config.stem_width
        for depth, width in zip(config.layers, config.widths):
            blocks = [IBasicBlock(in_channels, width, stride=2)]
            blocks += [IBasicBlock(width, width, stride=1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.last_stage(self.prefix(images))

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the input of the last stage (what trainable="last-stage" keeps frozen)."""
        size = self.config.input_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
            raise ValueError(f"images must have shape [B, 3, {size}, {size}], got {tuple(images.shape)}")
        return self.stages[:-1](self.stem(images))

    def last_stage(self, features: torch.Tensor) -> torch.Tensor:
        """`prefix`'s output -> the last feature map."""
        return self.stages[-1](features)

    def prefix_modules(self) -> List[nn.Module]:
        return [self.stem, *self.stages[:-1]]
