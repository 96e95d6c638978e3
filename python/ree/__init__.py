"""REE training package: backbone, PAM and PRM, the REE loss on the fused `ree_kernels` ops,
data (synthetic VLR faces, ImageFolder, RecordIO), training, evaluation and quality estimation."""

__version__ = "0.1.0"
