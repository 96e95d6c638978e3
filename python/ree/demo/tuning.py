"""`python -m ree.demo --tune`: the one-off tuning run behind the synthetic defaults of τ and the loss
weights, a small grid scored on the synthetic *validation* identities (never the test split)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .. import evaluation as ev
from ..data.synthetic import generate
from ..evaluation import pipeline as E
from ..train import Trainer
from .budget import DemoConfig
from .clock import say

TUNING_TAUS = (0.1, 0.2, 0.4)
TUNING_SCALES = (0.5, 1.0, 2.0)
"""`run_tuning` tries each τ with the weights at 1, then each common factor on (λ_L1, λ_ID,
λ_MSE) with the best τ."""
TUNING_STEPS = 300


def run_tuning(output: str | Path = "runs/tune", steps: int = TUNING_STEPS) -> Dict[str, float]:
    """The one tuning run behind TrainConfig's τ and loss weights: a coordinate search, first
    τ in TUNING_TAUS with the weights at 1, then a common factor in TUNING_SCALES on (λ_L1,
    λ_ID, λ_MSE) with the best τ; `steps` steps each on the demo's data. Each REE model is
    scored on the synthetic *validation* identities by TAR@FAR=1e-2 − ERC AUC of ξ̂ (FMR 1e-2,
    threshold recomputed): recognition up, quality error down. Writes output/report.md and
    returns the best {tau, lambda_l1, lambda_id, lambda_mse}."""
    demo = replace(DemoConfig(), steps=steps, warmup_steps=max(steps // 10, 1))
    out = Path(output)
    splits = generate(demo.synthetic, cache_dir=out / "cache")
    images, labels, resolutions = E.set_tensors(splits.val)
    protocol = E.make_protocol(labels, resolutions, num_pairs=4000, seed=demo.seed)
    rows: List[List[Any]] = []
    scores: Dict[Tuple[float, float], float] = {}

    def trial(tau: float, scale: float) -> float:
        if (tau, scale) in scores:
            return scores[(tau, scale)]
        values = {"tau": tau, "lambda_l1": scale, "lambda_id": scale, "lambda_mse": scale}
        say(f"tuning {values}")
        trainer = Trainer(demo.train_config("ree", out / f"tau{tau:g}_x{scale:g}", **values), dataset=splits.train)
        trainer.fit()
        scored = E.score(trainer.model, images, trainer.criterion.tracker.center_or_none(), seed=demo.seed)
        overall = E.recognition(scored, labels, resolutions, protocol)["overall"]
        erc = E.quality_ercs(E.pair_scores(scored, protocol), protocol, scored.qualities(), seed=demo.seed)
        auc = erc["recompute"]["REE ξ̂"].auc[E.ERC_FMRS[0]]
        scores[(tau, scale)] = overall["tar@0.01"] - auc
        rows.append([tau, scale, overall["tar@0.01"], overall["acc"], auc,
                     erc["recompute"]["feature norm"].auc[E.ERC_FMRS[0]], scores[(tau, scale)]])
        return scores[(tau, scale)]

    best_tau = max(TUNING_TAUS, key=lambda tau: trial(tau, 1.0))
    best_scale = max(TUNING_SCALES, key=lambda scale: trial(best_tau, scale))
    best = {"tau": best_tau, "lambda_l1": best_scale, "lambda_id": best_scale, "lambda_mse": best_scale}
    report = ev.Report("REE tuning on the validation identities")
    report.text(f"{steps} steps each on the demo's training set. First τ with λ = 1, then λ (a common factor on "
                "λ_L1, λ_ID, λ_MSE) with the best τ. Objective on the validation split: TAR@FAR=1e-2 − ERC AUC "
                f"of ξ̂ (FMR 1e-2, threshold recomputed). Best: {best}.")
    report.table(["τ", "λ", "TAR@FAR=1e-2", "10-fold acc", "ERC AUC ξ̂", "ERC AUC norm", "objective"], rows)
    report.write(out / "report.md")
    say(f"best {best} -> {out / 'report.md'}")
    return best
