"""The modules on top of the backbone's last feature map: the embedding head, the PRM and the PAM."""
from __future__ import annotations

import torch
from torch import nn

from .iresnet import BN_EPS


class EmbeddingHead(nn.Module):
    """Feature map [B, C, h, w] -> embedding v [B, D]: BN2d, dropout, FC over the flattened
    map, BN1d (insightface's iResNet output layer, whose BN1d scale is fixed at 1: a loaded
    pretrained scale stays as loaded). `eps`: both BatchNorms' epsilon (SFace's is 2e-5)."""

    def __init__(self, channels: int, feature_size: int, embedding_size: int, dropout: float = 0.0,
                 eps: float = BN_EPS) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * feature_size * feature_size, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=eps)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(torch.flatten(self.dropout(self.norm(feature_map)), 1)))

    def dropout_passes(self, feature_map: torch.Tensor, keep: torch.Tensor, dropout: float) -> torch.Tensor:
        """SER-FIQ's stochastic passes: `keep` [P, B, C, h, w] bool, the units that a dropout at
        rate `dropout` keeps in each pass, applied even in eval mode (each image's masks drawn by
        the caller) -> embeddings [P, B, D]."""
        # one layout for the map and the masks: a channels-last map would be reordered every pass
        x = torch.flatten(self.norm(feature_map).contiguous() / (1.0 - dropout), 1)
        return torch.stack([self.features(self.fc(x * torch.flatten(kept, 1))) for kept in keep])


class PRM(nn.Module):
    """Perceptibility regression module (docs/spec.md §1.5): ξ̂ = FC(Dropout(v)), one output per row.
    Its output is the face quality score at inference (docs/spec.md §1.11)."""

    def __init__(self, embedding_size: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(embedding_size, 1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(embeddings)).squeeze(1)


class ChannelAttention(nn.Module):
    """CBAM channel attention: a shared two-layer MLP on the average- and max-pooled map."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3))))
        return x * weights[:, :, None, None]


class SpatialAttention(nn.Module):
    """CBAM spatial attention: a k×k convolution of the channel mean and max."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class PAM(nn.Module):
    """[R] Perceptibility attention module (docs/spec.md §1.7): CBAM-style channel attention
    (reduction 16) then 7×7 spatial attention on the last feature map, average-pooled and
    projected to v^attn [B, D]. Trained by L_MSE towards the embedding with its UI-centre
    component removed. Reconstructed from the paper's prose (its layer sizes are not given)."""

    def __init__(self, channels: int, embedding_size: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)
        self.proj = nn.Linear(channels, embedding_size)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.proj(self.spatial(self.channel(feature_map)).mean((2, 3)))
