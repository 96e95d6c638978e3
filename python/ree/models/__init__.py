"""Models: the iResNet and SFace backbones, the embedding head, PRM, PAM, `ArcFaceHead` (the
kernels package's `ree_kernels.modules.ArcFaceHead`) and `REEModel` (pretrained weights: `sface`,
`arcface_torch`, and `ree.pretrained`)."""
from ree_kernels.modules import ArcFaceHead

from .heads import PAM, PRM, EmbeddingHead
from .iresnet import BACKBONES, BackboneConfig, IResNet, backbone_config
from .ree_model import ARCHS, Inference, ModelConfig, ModelOutput, REEModel, embed
from .sface import SFaceBackbone

__all__ = [
    "ARCHS",
    "BACKBONES",
    "PAM",
    "PRM",
    "ArcFaceHead",
    "BackboneConfig",
    "EmbeddingHead",
    "IResNet",
    "Inference",
    "ModelConfig",
    "ModelOutput",
    "REEModel",
    "SFaceBackbone",
    "backbone_config",
    "embed",
]
