"""The Triton backend: importing this package registers `ree::triton_head_forward`,
`ree::triton_head_backward` and `ree::triton_aux_forward` (backends.kernel_op imports it)."""
from . import aux, head  # noqa: F401  (registration on import)
