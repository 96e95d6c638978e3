"""The README's quick-start snippet, run as written with small stand-ins for the user's
network, computes what `REELoss` computes: the same loss, gradients and UI tracker."""
from pathlib import Path

import torch
from torch import nn

from ree.losses import REELoss
from ree.models.heads import PAM, PRM

README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start_code() -> str:
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


class Backbone(nn.Module):
    """images [B, 3, 4, 4] -> (feature map [B, 8, 4, 4], v [B, 512])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 512)

    def forward(self, images):
        feature_map = torch.relu(self.conv(images))
        return feature_map, self.fc(feature_map.flatten(1))


def test_readme_quick_start_matches_reeloss():
    torch.manual_seed(0)
    num_classes, batch = 7, 6
    backbone, prm, pam = Backbone(), PRM(512, dropout=0.0), PAM(8, 512)
    images = torch.randn(batch, 3, 4, 4)
    labels = torch.randint(0, num_classes, (batch,))
    is_ui = torch.tensor([False, False, False, False, True, True])
    networks = [backbone, prm, pam]

    scope = {"num_classes": num_classes, "backbone": backbone, "prm": prm, "pam": pam, "images": images,
             "labels": labels, "is_ui": is_ui}
    exec(compile(quick_start_code(), str(README), "exec"), scope)  # noqa: S102 - the README's own code
    snippet_grads = [p.grad.clone() for m in networks for p in m.parameters()]
    for p in (p for m in networks for p in m.parameters()):
        p.grad = None

    criterion = REELoss(512, num_classes)
    with torch.no_grad():
        criterion.head.weight.copy_(scope["head_weight"])
    feature_map, emb = backbone(images)
    out = criterion(emb, labels, prm(emb), pam(feature_map), is_ui)
    out.total.backward()

    assert float(out.mse) > 0  # the first UIs already gave a centre, so L_MSE is on
    torch.testing.assert_close(scope["loss"], out.total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scope["head_weight"].grad, criterion.head.weight.grad, rtol=1e-6, atol=1e-7)
    for got, expected in zip(snippet_grads, (p.grad for m in networks for p in m.parameters())):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scope["tracker"].center, criterion.tracker.center, rtol=0, atol=0)
    torch.testing.assert_close(scope["tracker"].mu, criterion.tracker.mu, rtol=0, atol=0)
