"""The synthetic demo's report: its prose around the tables of `tables`."""
from __future__ import annotations

from pathlib import Path

from .. import evaluation as ev
from ..evaluation import pipeline as E
from .budget import DemoConfig
from .tables import METHODS, best_quality_sentence, erc_rows, quality_resolution_rows, verdict, write_plots


def build_report(demo: DemoConfig, trainers, synthetic, digits, lfw, summary_rows, out: Path) -> ev.Report:
    ree_config = trainers["REE"][0].config
    report = ev.Report("REE vs ArcFace: the ree demo")
    report.text(
        "Both models: the same small iResNet (`arch=small`, 32×32 input), the same synthetic training "
        f"identities ({demo.synthetic.num_train_ids} × {demo.synthetic.train_per_id} images), "
        f"{demo.steps} SGD steps of "
        f"{demo.batch_size} images, ArcFace s={ree_config.scale:g}, m={ree_config.margin:g}. REE adds "
        f"{ree_config.uis_per_batch} synthesised UIs per batch and the auxiliary losses with τ={ree_config.tau:g}, "
        f"λ_L1={ree_config.lambda_l1:g}, λ_ID={ree_config.lambda_id:g}, λ_MSE={ree_config.lambda_mse:g} "
        "(chosen once by `python -m ree.demo --tune` on the validation identities, never the test ones: "
        "docs/tuning.md; the [R] parts of the method are reconstructions, see docs/spec.md §1). Test: "
        f"{demo.synthetic.num_test_ids} unseen identities × {demo.synthetic.test_per_id} images, "
        f"{demo.num_pairs} verification pairs, CMC with 20% of identities as gallery distractors.")
    report.heading("Summary")
    report.table(*summary_rows)
    report.text(verdict(*summary_rows))
    report.text("ERC AUC: FNMR at FMR 1e-2 integrated over reject fractions 0–0.95, threshold recomputed; "
                "REE's own quality is ξ̂, the baseline's the feature norm. LFW face AUC: that quality ranking "
                "100 real LFW faces above 100 non-faces. Lower ERC AUC is better; higher everything else.")
    report.heading("Recognition on the synthetic test identities")
    report.table(*E.recognition_rows(synthetic["recognition"]))
    report.heading("Per resolution bin", 3)
    report.text("Pairs are binned by the lower resolution of the two images, probes by their own.")
    report.table(*E.bin_rows(synthetic["recognition"]))
    report.heading("Quality: error-versus-reject (ERC)")
    report.text("For each recognizer's pairs, the qualities compared: REE's ξ̂ (the PRM output of the REE model, "
                "used for both recognizers), the recognizer's feature norm (MagFace/AdaFace style), ERS = 1 − cos to "
                "the UI centre, and random. FMR 1e-2; both threshold modes (docs/spec.md §7).")
    report.table(*erc_rows(synthetic["erc"], E.ERC_FMRS[0]))
    report.text(best_quality_sentence(synthetic["erc"], E.ERC_FMRS[0]))
    for name in METHODS:
        for mode in E.THRESHOLD_MODES:
            report.heading(f"{name}'s pairs, threshold {mode}", 3)
            report.text(ev.erc_table(synthetic["erc"][name][mode]))
    report.heading("Quality against resolution", 3)
    report.table(*quality_resolution_rows(synthetic))
    report.heading("Real data")
    report.heading("LFW faces vs non-faces (scikit-image lfw_subset)", 3)
    rows = [[name, q, auc] for name, aucs in lfw.items() for q, auc in aucs.items()]
    report.table(["model", "quality", "ROC AUC faces > non-faces"], rows)
    report.heading("Digits (scikit-learn load_digits, real 8×8 images) as a VLR recognition set", 3)
    report.text(f"Both models trained from scratch on the digits' train half ({demo.digits_steps} steps), "
                "evaluated on the other half: verification pairs and ERC.")
    report.table(*E.recognition_rows(digits["recognition"]))
    report.table(*erc_rows(digits["erc"], E.ERC_FMRS[0]))
    report.heading("Plots")
    for png, alt in write_plots(out, synthetic, digits):
        report.image(png, alt)
    return report
