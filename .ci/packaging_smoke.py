"""Run by .ci/packaging-check from outside the source tree, in an environment where ree-kernels
was installed (editable or from its wheel): the package imports from where it should, its
metadata agrees with the code, the C++ extension is loaded, and its ops agree with the eager
reference, forward and backward.

    python -I .ci/packaging_smoke.py --expect-under DIR
"""
from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path

import torch

import ree
import ree_kernels
from ree_kernels import backends


def check_location(module: object, root: Path) -> None:
    where = Path(module.__file__).resolve()
    if root not in where.parents:
        raise SystemExit(f"{module.__name__} was imported from {where}, expected under {root}")


def close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    if not torch.allclose(ours, ref, rtol=1e-4, atol=1e-5, equal_nan=True):
        raise SystemExit(f"{what}: backend 'cpu' differs from the reference by {(ours - ref).abs().max():.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--expect-under", type=Path, required=True,
                        help="the folder ree_kernels and ree must be imported from")
    root = parser.parse_args().expect_under.resolve()
    check_location(ree_kernels, root)
    check_location(ree, root)
    version = importlib.metadata.version("ree-kernels")
    if version != ree_kernels.__version__:
        raise SystemExit(f"installed metadata says {version}, ree_kernels.__version__ {ree_kernels.__version__}")
    if backends.EXTENSION_ERROR is not None or ("head", "CPU") not in backends.CPP_KERNELS:
        raise SystemExit(f"the C++ extension did not load: {backends.EXTENSION_ERROR}")

    g = torch.Generator().manual_seed(0)
    B, C, D = 13, 131, 19
    embeddings = torch.randn(B, D, generator=g)
    prototypes = torch.randn(C, D, generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    ui_center = torch.randn(D, generator=g)
    results = {}
    for backend in ("cpu", "reference"):
        e, w = embeddings.clone().requires_grad_(True), prototypes.clone().requires_grad_(True)
        out = ree_kernels.arcface_head(e, w, labels, ui_center, backend=backend)
        out.loss.backward()
        aux = ree_kernels.ree_aux_loss(out.ri, out.ri.detach() * 0.5, 0.1, backend=backend)
        results[backend] = (out, e.grad, w.grad, aux.total)
    (out, grad_e, grad_w, aux), (ref, ref_e, ref_w, ref_aux) = results["cpu"], results["reference"]
    for field in ("loss", "cos_pos", "cos_neg", "cos_ui", "ri", "lse"):
        close(getattr(out, field), getattr(ref, field), field)
    close(grad_e, ref_e, "grad embeddings")
    close(grad_w, ref_w, "grad prototypes")
    close(aux, ref_aux, "ree_aux_loss")
    print(f"ree-kernels {version} from {Path(ree_kernels.__file__).parent} (torch {torch.__version__}): "
          "the C++ ops match the reference")


if __name__ == "__main__":
    main()
