"""REE training package: backbone, PAM and PRM, the REE loss on the fused `ree_kernels` ops,
data (synthetic VLR faces, ImageFolder, RecordIO), training, evaluation and quality estimation."""

from .losses import REELoss
from .models import ArcFaceHead, ModelConfig, REEModel, embed

__all__ = ["ArcFaceHead", "ModelConfig", "REELoss", "REEModel", "embed"]
__version__ = "0.1.0"
