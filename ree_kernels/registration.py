"""The registration of every kernel op: fake kernels, autograd formulas, the torch.func wiring and
the refusal of a second derivative. Each backend registers its ops here (`register_head_ops`,
`register_aux_op`): the C++ ones and the emulated CUDA build from `loading`, Triton's when its
package is imported. The reference backend registers nothing with torch: `reference_op` hands
out its eager ops, and this is the one production module that imports `reference`.

The ops' contracts are in head.py (`head_forward`, `head_backward`, `head_forward_with_grad`)
and aux_loss.py (`aux_forward`). The ops are differentiable once: their backward is a fused
kernel (or a saved gradient), so a backward with create_graph=True raises rather than return a
gradient that cannot be differentiated again.

torch.func: torch.library's `register_autograd` builds an autograd.Function without
`setup_context`, which torch.func refuses ("it must override the setup_context staticmethod").
So each kernel op also gets an autograd.Function of its own here, with the same `setup_context`
and backward as its `register_autograd` registration, which `call` uses while a torch.func
transform is active (plain autograd and torch.compile keep the op's own registration). Its vmap
rule is generated: the op then runs under vmap, where torch's fallback runs it once per slice.
Forward-mode AD (`jvp`, `jacfwd`, `hessian`) raises, naming the op, the backend and what works
instead.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from . import reference
from .contract import stat_dtype

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


def _register_for_transforms(op_name: str, setup_context: Callable, backward: Callable) -> None:
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


# --------------------------------------------------------------------------------------------
# The head: head_forward, head_backward, head_forward_with_grad
# --------------------------------------------------------------------------------------------

def _grad_prototypes_like(prototypes, class_index):
    """The op's grad_prototypes: [C, D], or [C', D] with a class index."""
    if class_index is None:
        return torch.empty_like(prototypes)
    return prototypes.new_empty(class_index.shape[0], prototypes.shape[1])


def _head_forward_fake(embeddings, prototypes, labels, scale, margin, margin_mode, ignore_index,
                       chunk_size, grad_filter_eps, ui_center=None, ri_form="product", class_index=None):
    batch = embeddings.shape[0]
    row = embeddings.new_empty(batch, dtype=stat_dtype(embeddings.dtype))
    return (row, row.clone(), row.clone(), embeddings.new_empty(batch, dtype=torch.int64), row.clone(),
            row.clone(), row.clone())


def _head_forward_with_grad_fake(embeddings, prototypes, labels, row_coef, scale, margin, margin_mode,
                                 ignore_index, chunk_size, grad_filter_eps, ui_center=None, ri_form="product",
                                 class_index=None):
    *rows, cos_ui, ri = _head_forward_fake(embeddings, prototypes, labels, scale, margin, margin_mode, ignore_index,
                                           chunk_size, grad_filter_eps)
    loss = rows[0].new_empty(())
    return (loss, *rows, torch.empty_like(embeddings), _grad_prototypes_like(prototypes, class_index), cos_ui, ri)


def _head_backward_fake(embeddings, prototypes, labels, lse, row_grad, scale, margin, margin_mode,
                        chunk_size, grad_filter_eps, class_index=None):
    return torch.empty_like(embeddings), _grad_prototypes_like(prototypes, class_index)


def _scatter_rows(grad: torch.Tensor, shape: torch.Size, class_index: Optional[torch.Tensor]) -> torch.Tensor:
    """The [C, D] gradient of `prototypes` from the op's [C', D] one: row j goes to class_index[j],
    every other row is exactly 0."""
    if class_index is None:
        return grad
    return grad.new_zeros(shape).index_copy_(0, class_index, grad)


def refuse_double_backward(
    op: str,
    alternative: str = "use backend='reference', whose eager PyTorch differentiates any number of times",
    inputs_require_grad: bool = True,
    backend: Optional[str] = None,
) -> None:
    """Raises inside a backward run with create_graph=True (the only time a backward runs with
    grad mode on), before a kernel computes a gradient that autograd could not differentiate
    again: without this, a gradient penalty would silently add nothing (the saved gradients of
    `head_forward_with_grad` are constants) or fail inside the kernel.

    torch.func.grad always runs its backward with create_graph=True, to compose with outer
    transforms; `inputs_require_grad` (`requires_second_derivative` of the op's
    inputs) tells a second derivative (create_graph=True, grad of grad) from a first one.

    Raises:
        RuntimeError: naming the op, with `alternative` (what does differentiate twice).
    """
    if torch.is_grad_enabled() and inputs_require_grad:
        which = "" if backend is None else f" (backend={backend!r})"
        raise RuntimeError(
            f"{op} can be differentiated once only{which}: its backward is a fused kernel, so a backward "
            f"with create_graph=True (a gradient penalty, a Hessian-vector product, torch.func.grad of "
            f"grad) cannot go through it; {alternative}")


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True). A private torch query:
    where it is missing, assume it does, which is always safe (and costs a C × D copy)."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def _may_scale_in_place(*saved: torch.Tensor) -> bool:
    """Whether the saved gradients may be scaled in place: only in an eager backward on plain
    tensors at their last use. A traced backward (torch.compile, opcheck: FunctionalTensor or
    FakeTensor) must not mutate values that are also outputs of the forward graph, and with
    retain_graph=True they must survive for the next backward."""
    return (all(type(t) is torch.Tensor for t in saved) and not torch.compiler.is_compiling()
            and not transform_active() and not _graph_is_kept())


def _scaled(grad: torch.Tensor, grad_out: torch.Tensor, in_place: bool) -> torch.Tensor:
    """grad · grad_out, multiplied in at least float32 and rounded once to grad's dtype: an
    upstream gradient that fits in float32 (GradScaler's 2^16) must not overflow a float16
    factor inside the op."""
    if grad.dtype in (torch.float16, torch.bfloat16):
        return (grad.float() * grad_out.float()).to(grad.dtype)
    factor = grad_out.to(grad.dtype)
    return grad.mul_(factor) if in_place else grad * factor


def register_head_ops(prefix: str) -> None:
    """Registers the fake kernels and the autograd of `ree::{prefix}head_*`."""
    backward_op = getattr(torch.ops.ree, f"{prefix}head_backward")
    forward_name, with_grad_name = f"ree::{prefix}head_forward", f"ree::{prefix}head_forward_with_grad"

    def setup_forward(ctx, inputs, output):
        embeddings, prototypes, labels = inputs[:3]
        scale, margin, margin_mode, _, chunk_size, grad_filter_eps = inputs[3:9]
        class_index = inputs[11] if len(inputs) > 11 else None
        ctx.save_for_backward(embeddings, prototypes, labels, output[4], class_index)
        ctx.options = (scale, margin, margin_mode, chunk_size, grad_filter_eps)
        ctx.num_inputs = len(inputs)
        ctx.mark_non_differentiable(*output[1:])  # the statistics
        ctx.differentiated = requires_second_derivative(embeddings, prototypes)
        ctx.backend = backend_of(forward_name, embeddings.device)

    def backward_forward(ctx, grad_loss_rows, *_):
        refuse_double_backward(forward_name, inputs_require_grad=ctx.differentiated, backend=ctx.backend)
        embeddings, prototypes, labels, lse, class_index = ctx.saved_tensors
        # Grad mode is on here only where nothing differentiates the result (torch.func.grad's
        # backward, refused above otherwise): the backward op must not record a graph there.
        with torch.no_grad():
            extra = () if class_index is None else (class_index,)
            grad_e, grad_w = backward_op(embeddings, prototypes, labels, lse,
                                         grad_loss_rows.to(lse.dtype).contiguous(), *ctx.options, *extra)
            grad_w = _scatter_rows(grad_w, prototypes.shape, class_index)
        return (grad_e, grad_w) + (None,) * (ctx.num_inputs - 2)

    def setup_with_grad(ctx, inputs, output):
        class_index = inputs[12] if len(inputs) > 12 else None
        ctx.save_for_backward(output[6], output[7], class_index)
        ctx.prototypes_shape = inputs[1].shape
        ctx.differentiated = requires_second_derivative(*inputs[:2])
        ctx.backend = backend_of(with_grad_name, inputs[0].device)
        ctx.num_inputs = len(inputs)
        ctx.mark_non_differentiable(*output[1:])  # the statistics and the saved gradients
        # Only `loss` gets a gradient: materialising zeros for the others would allocate a C × D tensor.
        ctx.set_materialize_grads(False)

    def backward_with_grad(ctx, grad_loss, *_):
        if grad_loss is None:  # the loss got no gradient (grads are not materialised)
            return (None,) * ctx.num_inputs
        refuse_double_backward(with_grad_name, inputs_require_grad=ctx.differentiated, backend=ctx.backend)
        grad_e, grad_w, class_index = ctx.saved_tensors
        # At their last use, scaling in place keeps a single C × D gradient at the peak.
        in_place = _may_scale_in_place(grad_e, grad_w)
        grads = (_scaled(grad_e, grad_loss, in_place),
                 _scatter_rows(_scaled(grad_w, grad_loss, in_place), ctx.prototypes_shape, class_index))
        return grads + (None,) * (ctx.num_inputs - 2)

    torch.library.register_fake(forward_name)(_head_forward_fake)
    torch.library.register_fake(f"ree::{prefix}head_backward")(_head_backward_fake)
    torch.library.register_autograd(forward_name, backward_forward, setup_context=setup_forward)
    _register_for_transforms(forward_name, setup_forward, backward_forward)
    if hasattr(torch.ops.ree, f"{prefix}head_forward_with_grad"):  # only GRAD_IN_FORWARD backends need it
        torch.library.register_fake(with_grad_name)(_head_forward_with_grad_fake)
        torch.library.register_autograd(with_grad_name, backward_with_grad, setup_context=setup_with_grad)
        _register_for_transforms(with_grad_name, setup_with_grad, backward_with_grad)


# --------------------------------------------------------------------------------------------
# The auxiliary losses: aux_forward
# --------------------------------------------------------------------------------------------

def _aux_forward_fake(ri_pred, ri_target, mu_ui, attn, embeddings, ui_center, recognizable, tau, beta):
    scalar = ri_pred.new_empty((), dtype=stat_dtype(ri_pred.dtype))
    grad_ri = ri_pred.new_empty(ri_pred.shape, dtype=scalar.dtype)
    grad_attn = (ri_pred.new_empty((0,), dtype=scalar.dtype) if attn is None
                 else attn.new_empty(attn.shape, dtype=scalar.dtype))
    return scalar, scalar.clone(), scalar.clone(), grad_ri, grad_ri.clone(), grad_attn


def register_aux_op(prefix: str) -> None:
    """Registers the fake kernel and the autograd of `ree::{prefix}aux_forward`."""
    name = f"ree::{prefix}aux_forward"

    def setup_context(ctx, inputs, output):
        ri_pred, attn = inputs[0], inputs[3]
        ctx.save_for_backward(output[3], output[4], output[5])
        ctx.mark_non_differentiable(*output[3:])  # the gradients computed in the forward
        ctx.dtypes = (ri_pred.dtype, None if attn is None else attn.dtype)
        ctx.num_inputs = len(inputs)
        ctx.differentiated = requires_second_derivative(*(x for x in (ri_pred, attn) if x is not None))
        ctx.backend = backend_of(name, ri_pred.device)

    def backward(ctx, grad_l1, grad_id, grad_mse, *_):
        refuse_double_backward(name, inputs_require_grad=ctx.differentiated, backend=ctx.backend)
        d_l1, d_id, d_attn = ctx.saved_tensors
        ri_dtype, attn_dtype = ctx.dtypes
        grad_ri = (grad_l1 * d_l1 + grad_id * d_id).to(ri_dtype)
        grad_attn = None if attn_dtype is None else (grad_mse * d_attn).to(attn_dtype)
        grads = [None] * ctx.num_inputs
        grads[0], grads[3] = grad_ri, grad_attn
        return tuple(grads)

    torch.library.register_fake(name)(_aux_forward_fake)
    torch.library.register_autograd(name, backward, setup_context=setup_context)
    _register_for_transforms(name, setup_context, backward)


# --------------------------------------------------------------------------------------------
# The reference backend
# --------------------------------------------------------------------------------------------

def reference_op(name: str) -> Callable:
    """The reference backend's eager implementation of `name`: "arcface_head", "ree_aux_loss",
    or the kernel ops' contract "head_forward", "head_backward" (`reference.<name>_reference`)."""
    return getattr(reference, f"{name}_reference")
