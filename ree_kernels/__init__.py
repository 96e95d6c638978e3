"""Fused kernels for recognizability-aware face recognition training (REE, CVPR 2023).

Public ops (docs/spec.md §2): `arcface_head`, `ree_aux_loss`, `recognizability_index`, `pam_target`,
`UITracker`, the head's options `HeadOptions`, and the outputs `HeadOutput`, `AuxOutput`. Each op takes
`backend="auto" | "reference" | "cpu" | "cuda" | "triton"`.
"""
from .aux_loss import ree_aux_loss
from .backends import BACKENDS
from .contract import AuxOutput, HeadOptions, HeadOutput
from .head import arcface_head
from .loading import load_triton, register_extension_ops
from .sampling import SampledClasses, num_sampled, sample_classes
from .statistics import pam_target, recognizability_index
from .tracker import UITracker

register_extension_ops()  # the C++ ops' fakes and autograd, where the extension is built
load_triton()  # registers torch.ops.ree.triton_* where Triton can run; never raises

__all__ = [
    "BACKENDS",
    "AuxOutput",
    "HeadOptions",
    "HeadOutput",
    "SampledClasses",
    "UITracker",
    "arcface_head",
    "num_sampled",
    "pam_target",
    "recognizability_index",
    "ree_aux_loss",
    "sample_classes",
]
__version__ = "0.1.0"
