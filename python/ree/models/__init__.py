"""Models: the iResNet backbones, the embedding head, PRM, PAM, `ArcFaceHead` and `REEModel`."""
from .arcface import ArcFaceHead
from .heads import PAM, PRM, EmbeddingHead
from .iresnet import BACKBONES, BackboneConfig, IResNet, backbone_config
from .ree_model import Inference, ModelConfig, ModelOutput, REEModel, embed

__all__ = [
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
    "backbone_config",
    "embed",
]
