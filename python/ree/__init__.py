"""REE training package: backbone, PAM and PRM, the REE loss on the fused `ree_kernels` ops,
data (LFW, synthetic VLR faces, ImageFolder, RecordIO), training, evaluation (the LFW-VLR
benchmark among it) and quality estimation."""

from ree_kernels import __version__

from .losses import REELoss
from .models import ArcFaceHead, ModelConfig, REEModel, embed

__all__ = ["ArcFaceHead", "ModelConfig", "REELoss", "REEModel", "__version__", "embed"]
