"""The Triton backend: importing this package registers `ree::triton_head_forward`,
`ree::triton_head_backward` and `ree::triton_aux_forward` (ree_kernels imports it where Triton can run)."""
from . import aux_loss, head  # noqa: F401  (registration on import)
