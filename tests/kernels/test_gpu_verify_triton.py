"""benchmarks/gpu_verify_triton.py: the Triton kernels compiled for sm_80/sm_90 without a GPU,
through the real launchers (Triton's bundled ptxas runs on the CPU). The full sweep is
`make gpu-verify-triton`; these tests check the checker and the fixes it led to, cheaply. Each
compiles in a child process: the test session runs Triton's interpreter (conftest.py), which
must be off, from the first import, to compile."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton")

_PRELUDE = """
import json, sys, torch
from dataclasses import asdict
from benchmarks import gpu_verify_triton as gpu_verify
from ree_kernels.triton import aux_loss, head, tiling
META = torch.device("meta")
e = torch.empty(1024, 512, dtype=DTYPE, device=META)
w = torch.empty(100_000, 512, dtype=DTYPE, device=META)
labels = torch.empty(1024, dtype=torch.int64, device=META)
rows = torch.empty(1024, device=META)
records = []
"""


def _compile(arch: int, dtype: str, body: str) -> list:
    """Runs `body` (launches, with e, w, labels, rows at B=1024, C=100000, D=512 on the meta
    device) for sm_`arch` in a child process; returns the compile records as dicts."""
    code = (_PRELUDE.replace("DTYPE", f"torch.{dtype}")
            + f"with gpu_verify.offline_target({arch}, ['test'], records, ptxas_timeout=300):\n"
            + textwrap.indent(textwrap.dedent(body).strip() + "\n", "    ")
            + "print(json.dumps([asdict(r) for r in records]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _problems(records: list) -> list:
    return [(r["kernel"], r["config"], r["problems"]) for r in records if r["problems"]]


@pytest.mark.parametrize("arch", [80, 90])
def test_norms_and_aux_kernels_compile_with_explicit_fp_fusion(arch):
    """Every launch passes enable_fp_fusion (Triton 3.10 changes its default: before, the norms
    and aux launches did not), and these kernels compile without spills, with registers and
    shared memory reported."""
    records = _compile(arch, "bfloat16", """
        keep = torch.empty(1024, dtype=torch.bool, device=META)
        ui = torch.empty(512, device=META)
        head._squared_norms(e, ui, rows)
        head._squared_norms(w)
        aux_loss.aux_losses(rows, rows, rows[:1], e, e, ui, keep, 0.1, 1.0)
        """)
    assert {r["kernel"] for r in records} == {"norms_kernel", "_aux_rows_kernel", "_aux_means_kernel"}
    assert _problems(records) == []
    assert all(r["registers"] and r["spill_bytes"] == 0 and r["shared"] is not None for r in records)


@pytest.mark.parametrize("arch, tile, problem", [
    (90, (128, 256, 64, 8, 3), "spills"),  # a forward candidate before: 1,072 B of spills on sm_90
    (80, (128, 256, 128, 8, 3), "shared memory"),  # 196,608 B; an A100 gives a block 166,912 B
])
def test_the_check_fails_on_spills_and_on_shared_memory(arch, tile, problem):
    """The checker can fail: a wide forward tile is reported."""
    records = _compile(arch, "bfloat16", f"""
        tiling.FORWARD_CONFIGS = {{"16-bit": ({tile},)}}
        head.forward_rows(e, w, labels, 64.0, 0.5, "arcface", -100, 0)
        """)
    tiles = [r for r in records if r["kernel"] == "forward_tiles_kernel"]
    assert len(tiles) == 1
    assert any(p.startswith(problem) for p in tiles[0]["problems"]), tiles[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_backward_candidates_compile_without_spills_on_sm90(dtype):
    """The backward tiles a launch at B=1024, C=100000, D=512 compiles. Before: every bf16
    candidate spilled, and float32's spilled ~100 KB per thread (BLOCK_DO = 512 and 256)."""
    records = _compile(90, dtype, """
        head.backward_grads(e, w, labels, rows, rows, 64.0, 0.5, "arcface", 0, 0.0)
        """)
    assert _problems(records) == []
    assert sorted(r["kernel"] for r in records if r["kernel"].startswith("grad_")) == [
        "grad_embeddings_kernel", "grad_prototypes_kernel"]  # one tile: the autotuner compiles nothing more


@pytest.mark.parametrize("arch, forward_warps, backward_warps", [(80, {8}, {4}), (90, {4}, {8})])
def test_ampere_takes_its_own_warps_for_float32_tiles(arch, forward_warps, backward_warps):
    """The tiling asks Triton's target for the compute capability: on sm_80 the float32 forward
    tiles of chunk_size 16 take 8 warps and the filtered backward tile of chunk_size 128 keeps 4
    (with Triton 3.6, sm_80 spilled 48 B and 8 B with the sm_90 choices, kept there), spill-free."""
    records = _compile(arch, "float32", """
        head.forward_rows(e, w, labels, 64.0, 0.5, "arcface", -100, 16)
        head.backward_grads(e, w, labels, rows, rows, 64.0, 0.5, "arcface", 128, 1e-6)
        """)

    def warps(kernel):
        return {int(r["config"].split("warps=")[1].split()[0]) for r in records if r["kernel"] == kernel}

    assert warps("forward_tiles_kernel") == forward_warps
    assert warps("grad_embeddings_kernel") == warps("grad_prototypes_kernel") == backward_warps
    assert _problems(records) == []


def test_class_index_path_compiles_without_spills_on_sm90():
    """PartialFC sampling: the forward and backward kernels that read the prototypes through a
    class index (HAS_INDEX) compile for sm_90 without spills."""
    records = _compile(90, "bfloat16", """
        index = torch.empty(10_000, dtype=torch.int64, device=META)
        head.forward_rows(e, w, labels, 64.0, 0.5, "arcface", -100, 0, class_index=index)
        head.backward_grads(e, w, labels, rows, rows, 64.0, 0.5, "arcface", 0, 0.0, class_index=index)
        """)
    assert _problems(records) == []
    assert {"norms_kernel", "forward_tiles_kernel", "grad_prototypes_kernel"} <= {r["kernel"] for r in records}
