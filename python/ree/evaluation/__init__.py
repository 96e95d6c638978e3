"""Evaluation (docs/spec.md §7): verification (ROC, TAR@FAR, k-fold accuracy), identification (CMC with
distractors), quality (ERC / EDC with AUC and pAUC, ranking AUC), resolution bins, markdown
reports, bootstrap intervals of verification metrics (`ree.evaluation.bootstrap`). Metrics use
numpy only. Plots live in `ree.evaluation.plots` (matplotlib, Agg), imported on demand so the
metrics stay light."""
from .bins import resolution_bins
from .identification import DISTRACTOR_LABEL, cmc, cmc_curve, probe_ranks
from .quality import DEFAULT_FMRS, DEFAULT_REJECT, ErcResult, erc, rejection_order, roc_auc
from .report import Report, cmc_table, erc_table, markdown_table
from .verification import kfold_accuracy, roc, tar_at_far, threshold_at_fmr

__all__ = [
    "DEFAULT_FMRS",
    "DEFAULT_REJECT",
    "DISTRACTOR_LABEL",
    "ErcResult",
    "Report",
    "cmc",
    "cmc_curve",
    "cmc_table",
    "erc",
    "erc_table",
    "kfold_accuracy",
    "markdown_table",
    "probe_ranks",
    "rejection_order",
    "resolution_bins",
    "roc",
    "roc_auc",
    "tar_at_far",
    "threshold_at_fmr",
]
