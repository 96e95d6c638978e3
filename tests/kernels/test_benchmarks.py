"""The benchmark harness's logic (docs/spec.md §6): statistics, workspace accounting, output schema,
and a tiny end-to-end run. No timing is asserted."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import harness, providers, report, run  # noqa: E402
from benchmarks.harness import Budget, Stats  # noqa: E402
from benchmarks.providers import Unavailable, _plain_ce_call, make_inputs  # noqa: E402
from benchmarks.report import CSV_COLUMNS, Key  # noqa: E402


@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], [0.3, 9.0, 2.5, 2.5, 7.1, 4.4, 1.2], list(range(100, 0, -3))])
@pytest.mark.parametrize("q", [0, 20, 50, 80, 100])
def test_percentile_matches_numpy_linear(values, q):
    assert harness.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        harness.percentile([], 50)
    with pytest.raises(ValueError):
        harness.percentile([1.0], 101)


def test_stats_are_ordered_percentiles():
    stats = Stats.of([10.0, 1.0, 4.0, 7.0, 2.0, 100.0])
    assert stats == Stats(5.5, 2.0, 10.0)


def test_workspace_subtracts_the_state_before_and_the_returned_gradients():
    assert harness.workspace_bytes(peak=1000, before=300, returned=200) == 500
    # An RSS reading below before + gradients (reused pages) is no workspace, not a negative one.
    assert harness.workspace_bytes(peak=400, before=300, returned=200) == 0


def test_budget_repeats_fill_the_time_within_bounds():
    budget = Budget(warmup_s=0.1, measure_s=2.0, min_reps=5, max_reps=50)
    assert budget.repeats(0.1) == 20
    assert budget.repeats(10.0) == 5
    assert budget.repeats(1e-6) == 50


def test_rotation_covers_twice_the_cache():
    assert harness.rotation_sets(bytes_per_set=4 << 20, cache_bytes=32 << 20) == 16
    assert harness.rotation_sets(bytes_per_set=20 << 20, cache_bytes=32 << 20) == 4
    assert harness.rotation_sets(bytes_per_set=100 << 20, cache_bytes=32 << 20) == 1


def _results():
    head = dict(kernel="head", mode="full", B=8, C=100, D=4, dtype="float32")
    return {
        Key(provider="floor", metric="time_ms", **head): Stats(2.0, 1.5, 2.5),
        Key(provider="eager", metric="time_ms", **head): Stats(8.0, 7.0, 9.0),
        Key(provider="cpu", metric="time_ms", **head): Stats(4.0, 3.0, 5.0),
        Key(provider="eager", metric="peak_mem_mb", **head): Stats(30.0, 30.0, 30.0),
        Key(provider="cpu", metric="peak_mem_mb", **head): Stats(3.0, 3.0, 3.0),
        Key(provider="floor", metric="peak_mem_mb", **head): Stats(0.0, 0.0, 0.0),
        Key("aux", "eager", "fwd", "time_ms", 8, 0, 4, "float32"): Stats(1.0, 0.5, 1.5),
    }


def test_csv_has_the_spec_columns(tmp_path):
    rows = report.csv_rows(_results(), "cpu-test-2t", "abc123", "2026-01-01T00:00:00+00:00")
    path = tmp_path / "x.csv"
    report.write_csv(path, rows)
    with open(path) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        read = list(reader)
    assert len(read) == len(_results())
    aux = [r for r in read if r["kernel"] == "aux"]
    assert aux[0]["C"] == "" and aux[0]["metric"] == "time_ms"
    cpu = next(r for r in read if r["provider"] == "cpu" and r["metric"] == "time_ms")
    assert (float(cpu["p20"]), float(cpu["p50"]), float(cpu["p80"])) == (3.0, 4.0, 5.0)
    assert {r["device"] for r in read} == {"cpu-test-2t"} and {r["commit"] for r in read} == {"abc123"}


def test_ratios_against_floor_and_eager_within_the_run():
    by_provider = {r["provider"]: r for r in report.ratios(_results()) if r["kernel"] == "head"}
    assert by_provider["cpu"]["time_vs_floor"] == pytest.approx(2.0)
    assert by_provider["cpu"]["time_vs_eager"] == pytest.approx(0.5)
    assert by_provider["cpu"]["eager_workspace_over_this"] == pytest.approx(10.0)
    assert by_provider["eager"]["eager_workspace_over_this"] == pytest.approx(1.0)
    assert by_provider["floor"]["eager_workspace_over_this"] is None  # 0 MB: no ratio
    coarse = {r["provider"]: r for r in report.ratios(_results(), resolution_mb=5.0) if r["kernel"] == "head"}
    assert coarse["cpu"]["eager_workspace_over_this"] is None and coarse["cpu"]["workspace_mb"] == 3.0
    aux = next(r for r in report.ratios(_results()) if r["kernel"] == "aux")
    assert aux["time_vs_floor"] is None and aux["time_vs_eager"] == pytest.approx(1.0)
    assert "workspace_mb" not in aux  # fwd only: the workspace is a forward+backward figure


def test_summary_table_shows_each_provider_once():
    table = report.summary_table(_results()).splitlines()
    assert table[0].split()[:4] == ["kernel", "shape", "dtype", "provider"]
    cpu = next(line for line in table if " cpu " in line)
    assert "2.00x" in cpu and "0.50x" in cpu and "10.00x" in cpu
    assert len(table) == 1 + 4


def test_cpu_workspace_of_the_floor_is_its_logits():
    """The fresh-process RSS measurement, end to end: the floor's forward+backward holds its
    [B, C] logits beyond the inputs and the two returned products."""
    B, C, D = 128, 16384, 64
    case = run.Case("head", "floor", B, C, D, "float32", "cpu")
    workspace = harness.subprocess_workspace(run.worker_argv(case, cos_pos=0.8, seed=0))
    assert abs(workspace / harness.MB - B * C * 4 / harness.MB) < 1.0


def test_tiny_run_writes_csv_json_png(tmp_path, capsys):
    code = run.main(["--suite", "quick", "--shape", "16,500,8", "--providers", "floor,eager",
                     "--modes", "fwd,full", "--repeats", "3", "--out", str(tmp_path)])
    assert code == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    device = report.device_name("cpu")
    assert f"head_{device}_quick-custom.csv" in files and f"aux_{device}_quick-custom.csv" in files
    assert f"summary_{device}_quick-custom.json" in files
    pngs = [p for p in tmp_path.glob("*.png")]
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    with open(tmp_path / f"head_{device}_quick-custom.csv") as f:
        rows = list(csv.DictReader(f))
    seen = {(r["provider"], r["mode"], r["metric"]) for r in rows}
    assert seen == {(p, m, "time_ms") for p in ("floor", "eager") for m in ("fwd", "full")} | {
        ("floor", "full", "peak_mem_mb"), ("eager", "full", "peak_mem_mb")}
    for r in rows:
        assert (r["B"], r["C"], r["D"], r["dtype"]) == ("16", "500", "8", "float32")
        assert 0 <= float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
        if r["metric"] == "time_ms":
            assert float(r["p20"]) > 0

    summary = json.loads((tmp_path / f"summary_{device}_quick-custom.json").read_text())
    floor = next(r for r in summary["ratios"] if r["provider"] == "floor" and r["mode"] == "full")
    assert floor["time_vs_floor"] == pytest.approx(1.0)
    assert {(s["kernel"], s["provider"]) for s in summary["skipped"]} == {("aux", "floor")}
    assert summary["failures"] == []
    out = capsys.readouterr().out
    assert "skipped aux/floor" in out
    last = out.rstrip().splitlines()[-1].split()
    assert last[0] == "aux" and "eager" in last  # the table ends the output


def test_a_failing_provider_is_reported_and_fails_the_run(tmp_path, capsys, monkeypatch):
    def broken(case, **_):
        if case.provider == "eager":
            raise ZeroDivisionError("planted")
        return real_build(case, **_)

    real_build = run.build
    monkeypatch.setattr(run, "build", broken)
    code = run.main(["--suite", "quick", "--shape", "16,500,8", "--providers", "floor,eager",
                     "--kernels", "head", "--repeats", "2", "--no-memory", "--no-plot", "--out", str(tmp_path)])
    assert code == 1
    assert "FAILED head/eager" in capsys.readouterr().out


def test_eager_over_the_memory_limit_is_skipped_with_the_reason(tmp_path, capsys):
    code = run.main(["--suite", "quick", "--shape", "64,4000,8", "--providers", "eager", "--kernels", "head",
                     "--eager-limit-gb", "0.001", "--repeats", "2", "--no-memory", "--no-plot", "--out", str(tmp_path)])
    assert code == 0
    assert "skipped head/eager" in capsys.readouterr().out
    summary = json.loads(next(tmp_path.glob("summary_*.json")).read_text())
    assert [s["provider"] for s in summary["skipped"]] == ["eager"]
    assert "--eager-limit-gb" in summary["skipped"][0]["reason"]


@pytest.mark.parametrize("argv", [["--shape", "1,2"], ["--shape", "0,10,4"], ["--providers", "eager,nope"],
                                  ["--modes", "sideways"], ["--cos-pos", "1.0"],
                                  ["--repeats", "0"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        run.parse_args(argv)


def test_approximation_error_against_the_exact_provider(tmp_path, capsys, monkeypatch):
    # The GPU's triton-filter vs triton, played here by the C++ aux kernel vs the reference.
    monkeypatch.setitem(run.EXACT_COUNTERPART, "cpu", "eager")
    code = run.main(["--suite", "quick", "--kernels", "aux", "--shape", "40,1,24", "--providers", "cpu",
                     "--repeats", "2", "--no-memory", "--no-plot", "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads(next(tmp_path.glob("summary_*.json")).read_text())
    [record] = summary["approximation_errors"]
    assert (record["provider"], record["exact"], record["B"], record["D"]) == ("cpu", "eager", 40, 24)
    for name in ("loss", "grad_ri_pred", "grad_attn"):
        assert 0 <= record[f"{name}_rel_error"] < 1e-5
    assert "cpu vs eager" in capsys.readouterr().out


def test_a_busy_machine_is_flagged():
    assert run.busy_warning(0.0) is None and run.busy_warning(None) is None
    assert "unreliable" in run.busy_warning(100.0)


@pytest.mark.gpu
def test_tiny_gpu_run_measures_time_and_allocator_workspace(tmp_path):
    code = run.main(["--suite", "gpu", "--shape", "64,1000,32", "--providers", "floor,eager",
                     "--repeats", "3", "--no-plot", "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads(next(tmp_path.glob("summary_cuda-*.json")).read_text())
    head = {r["provider"]: r for r in summary["ratios"] if r["kernel"] == "head" and r["mode"] == "full"}
    # The floor holds its [B, C] bf16 logits beyond the inputs and gradients (and at most a
    # cuBLAS workspace, if one is allocated inside the step).
    logits_mb = 64 * 1000 * 2 / 2**20
    assert logits_mb <= head["floor"]["workspace_mb"] < logits_mb + 1.0
    assert head["eager"]["workspace_mb"] > head["floor"]["workspace_mb"]
    assert all(r["time_ms"] > 0 for r in summary["ratios"])


def _plain_ce_reference(x):
    """Plain linear cross-entropy in float64 eager PyTorch: the loss and its two gradients."""
    e = x["embeddings"].double().requires_grad_(True)
    w = x["prototypes"].double().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(e @ w.T, x["labels"])
    return (loss, *torch.autograd.grad(loss, (e, w)))


def test_cut_cross_entropy_peer_is_plain_linear_cross_entropy():
    case = run.Case("head", "cce-compile", 24, 300, 16, "float32", "cpu")
    forward, backward = run.build(case, eager_limit_bytes=float("inf"))
    x = make_inputs(case, cos_pos=0.8, seed=3)
    state = forward(x)
    ours = (state[0][0].detach(), *backward(state))
    for got, want in zip(ours, _plain_ce_reference(x)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_liger_peer_call_is_plain_linear_cross_entropy():
    # Liger's Triton kernels run here in Triton's interpreter (tests/conftest.py sets it), which
    # checks the call the GPU suite makes; the provider itself is GPU-only.
    pytest.importorskip("liger_kernel", reason="liger-kernel is pinned in requirements.txt")
    x = make_inputs(run.Case("head", "liger", 16, 200, 16, "float32", "cpu"), cos_pos=0.5, seed=4)
    e = x["embeddings"].clone().requires_grad_(True)
    w = x["prototypes"].clone().requires_grad_(True)
    loss = _plain_ce_call("liger")(e, w, x["labels"])
    ours = (loss.detach(), *torch.autograd.grad(loss, (e, w)))
    for got, want in zip(ours, _plain_ce_reference(x)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("provider,kernel,device,reason", [
    ("cce-compile", "aux", "cpu", "head only"),
    ("liger", "aux", "cpu", "head only"),
    ("cce", "head", "cpu", "GPU only"),
    ("liger", "head", "cpu", "GPU only"),
])
def test_peers_that_cannot_run_say_why(provider, kernel, device, reason):
    case = run.Case(kernel, provider, 8, 0 if kernel == "aux" else 50, 8, "float32", device)
    with pytest.raises(Unavailable, match=reason):
        run.build(case, eager_limit_bytes=float("inf"))


def test_a_missing_peer_package_is_skipped_with_the_install_command(tmp_path, capsys, monkeypatch):
    real_find_spec = providers.importlib.util.find_spec
    monkeypatch.setattr(providers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "cut_cross_entropy" else real_find_spec(name, *a))
    code = run.main(["--suite", "quick", "--shape", "16,500,8", "--providers", "cce-compile,floor",
                     "--kernels", "head", "--repeats", "2", "--no-memory", "--no-plot", "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads(next(tmp_path.glob("summary_*.json")).read_text())
    [skipped] = summary["skipped"]
    assert skipped["provider"] == "cce-compile" and "pip install cut-cross-entropy" in skipped["reason"]


def test_gradients_computed_in_the_forward_are_noted_where_fwd_and_bwd_are_shown(tmp_path, capsys):
    code = run.main(["--suite", "quick", "--shape", "16,500,8", "--providers", "floor,cpu", "--kernels", "head",
                     "--modes", "fwd,bwd,full", "--repeats", "2", "--no-memory", "--no-plot", "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads(next(tmp_path.glob("summary_*.json")).read_text())
    [note] = summary["notes"]
    assert note.startswith("head/cpu:") and "GRAD_IN_FORWARD" in note
    assert "note: head/cpu:" in capsys.readouterr().out
    assert providers.gradients_in_forward("head", "floor") is None
    assert providers.gradients_in_forward("head", "eager") is None


def test_no_note_when_only_the_full_step_is_shown(tmp_path):
    code = run.main(["--suite", "quick", "--shape", "16,500,8", "--providers", "cpu", "--kernels", "head",
                     "--modes", "full", "--repeats", "2", "--no-memory", "--no-plot", "--out", str(tmp_path)])
    assert code == 0
    assert json.loads(next(tmp_path.glob("summary_*.json")).read_text())["notes"] == []
