"""The kernel ops under torch.func transforms (`grad`, `vjp`, `vmap` and their compositions).

torch.library's `register_autograd` builds an autograd.Function without `setup_context`, which
torch.func refuses ("it must override the setup_context staticmethod"). So each kernel op also
gets an autograd.Function of its own here, with the same `setup_context` and backward as its
`register_autograd` registration, which `call` uses while a torch.func transform is active
(plain autograd and torch.compile keep the op's own registration). Its vmap rule is generated:
the op then runs under vmap, where torch's fallback runs it once per slice. Forward-mode AD
(`jvp`, `jacfwd`, `hessian`) raises, naming the op, the backend and what works instead.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

FORWARD_AD_ALTERNATIVE = ("use reverse mode (torch.func.grad, vjp, jacrev) or backend='reference', whose "
                          "eager PyTorch supports forward-mode AD")

_FUNCTIONS: Dict[str, type] = {}


def transform_active() -> bool:
    """Whether a torch.func transform (grad, vjp, vmap, jvp, ...) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def requires_second_derivative(*inputs: torch.Tensor) -> bool:
    """Whether an op's differentiable inputs, as its `setup_context` sees them, are tracked by an
    autograd beyond the one differentiating the op now: plain autograd's (a backward with
    create_graph=True differentiates them again), or an outer torch.func.grad level's
    (grad of grad). Under torch.func.grad the inputs are wrapped at the level being
    differentiated; what they wrap (past any vmap wrappers) says whether an outer level tracks
    them. Without a transform, every input that requires a gradient may be differentiated twice."""
    def tracked(x: torch.Tensor) -> bool:
        if torch._C._functorch.is_functorch_wrapped_tensor(x):
            x = torch._C._functorch.get_unwrapped(x)
            while torch._C._functorch.is_batchedtensor(x):
                x = torch._C._functorch.get_unwrapped(x)
        return x.requires_grad

    return any(tracked(x) for x in inputs)


def backend_of(op_name: str, device: torch.device) -> str:
    """The backend name of a kernel op ("ree::triton_…" is Triton's; the C++ ops run the
    backend of their device), for error messages."""
    return "triton" if op_name.startswith("ree::triton_") else device.type


def register(op_name: str, setup_context: Callable, backward: Callable) -> None:
    """Builds the torch.func-capable autograd.Function of `op_name` (e.g. "ree::head_forward")
    from the op's `register_autograd` pieces; `setup_context` must set `ctx.backend`
    (`backend_of`), which the errors name."""
    op = getattr(torch.ops.ree, op_name.split("::", 1)[1])

    def forward(*args):
        return op(*args)

    def jvp(ctx, *_):
        raise RuntimeError(f"{op_name} (backend={ctx.backend!r}) has no forward-mode derivative "
                           f"(torch.func.jvp, jacfwd, hessian); {FORWARD_AD_ALTERNATIVE}")

    name = "Func_" + op_name.replace("::", "_")
    _FUNCTIONS[op_name] = type(name, (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "jvp": staticmethod(jvp),
    })


def call(op: Callable, *args):
    """Runs the kernel op `op` (a torch.ops.ree packet) on positional `args`: through its
    autograd.Function while a torch.func transform is active in eager mode, else the op itself
    (torch.compile traces the op's own registration, and cannot trace a Function with `jvp`)."""
    if transform_active() and not torch.compiler.is_compiling():
        return _FUNCTIONS[op._qualified_op_name].apply(*args)
    return op(*args)
