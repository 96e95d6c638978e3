"""Data for the REE training package (images everywhere: float32 [3, H, W], (x/255 - 0.5)/0.5).

- `synthetic`: the embedded default set, procedural very-low-resolution faces from a seed.
- `protocol`: verification pairs and gallery / probe identification with distractors.
- `degrade`: VLR degradation of one image, and the batch UI synthesis of docs/spec.md §1.10 [R].
- `images`: the one image decoder (every Pillow mode to uint8 RGB, or a clear error).
- `folders` / `recordio`: ImageFolder, insightface .rec/.idx (no mxnet), image files.
- `sources`: the training set a `TrainConfig` names, its class count and names.
- `real`: LFW faces vs non-faces (scikit-image) and 8x8 digits (scikit-learn), shipped data.
- `lfw` / `lfw_splits` (imported on use): LFW as users have it, and the LFW-VLR splits.
"""
# The modules stay reachable as attributes (`ree.data.degrade` is the module, its function is
# `ree.data.degrade.degrade`).
from . import arrays, degrade, faces, folders, images, protocol, real, recordio, sources, synthetic  # noqa: F401
from .arrays import IGNORE_LABEL, FaceArrays, to_tensor
from .degrade import synthesize_uis
from .folders import ImageFolderDataset, load_images
from .images import decode_image
from .protocol import IdentificationSplit, identification_protocol, verification_pairs
from .real import digits, lfw_faces_vs_nonfaces
from .recordio import RecordIODataset, RecordIOError, pack_payload, unpack_payload, write_recordio
from .synthetic import SyntheticConfig, SyntheticSplits, generate

__all__ = [
    "IGNORE_LABEL", "FaceArrays", "to_tensor", "synthesize_uis", "ImageFolderDataset", "decode_image",
    "load_images", "IdentificationSplit", "identification_protocol", "verification_pairs", "digits",
    "lfw_faces_vs_nonfaces", "RecordIODataset", "RecordIOError", "pack_payload", "unpack_payload",
    "write_recordio", "SyntheticConfig", "SyntheticSplits", "generate",
]
