"""The demo pipeline end to end at its smoke-test size (`--quick`): every section of the report
is produced from nothing, with finite numbers for both models."""
import json
import math

import pytest

from ree.demo.__main__ import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_demo_writes_the_report(tmp_path, capsys):
    assert main(["--quick", "--synthetic", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| REE |" in out and "| ArcFace |" in out
    report = (tmp_path / "report.md").read_text()
    for section in ("## Summary", "Per resolution bin", "## Quality: error-versus-reject", "threshold recompute",
                    "threshold fixed", "LFW faces vs non-faces", "Digits", "## Plots"):
        assert section in report
    for png in ("erc_ree_recompute.png", "erc_arcface_fixed.png", "cmc.png", "quality_vs_resolution.png",
                "erc_digits.png"):
        assert (tmp_path / png).stat().st_size > 1000
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("REE", "ArcFace"):
        overall = metrics["synthetic"]["recognition"][name]["overall"]
        assert 0.0 <= overall["acc"] <= 1.0 and 0.0 <= overall["rank-20"] <= 1.0
        assert all(0.0 <= v <= 1.0 for v in metrics["lfw_face_auc"][name].values())
    assert "REE ξ̂" in metrics["lfw_face_auc"]["REE"] and "REE ξ̂" not in metrics["lfw_face_auc"]["ArcFace"]
    assert math.isfinite(metrics["digits"]["erc"]["REE"]["fixed"]["REE ξ̂"]["auc"]["0.01"])
