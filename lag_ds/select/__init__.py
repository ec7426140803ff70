"""Selection over curves: LAG@k, selection.json, and the paper's analysis metrics.

Knows only curves (numpy); see :mod:`lag_ds.select.lag` for the decision rule.
"""

from lag_ds.select.curves import DEFAULT_TAG, Curve, CurveSummary, load_curve, read_records
from lag_ds.select.lag import (
    NoEligibleCandidate,
    RankedCandidate,
    Selection,
    select_lag,
    smoothed_loss,
)
from lag_ds.select.metrics import (
    argmin_name,
    losses_at,
    pearson,
    rankdata,
    recall_at_k,
    regret,
    relative_regret,
    spearman,
    step_correlation,
)
from lag_ds.select.policies import (
    PolicyOutcome,
    replay_lag,
    replay_settle,
    replay_sh,
    settle_step,
    sh_keep,
    sh_rungs,
)
from lag_ds.select.selection_file import (
    SELECTION_VERSION,
    SelectionFile,
    read_selection_json,
    write_selection_json,
)

__all__ = [
    "DEFAULT_TAG", "Curve", "CurveSummary", "load_curve", "read_records",
    "NoEligibleCandidate", "RankedCandidate", "Selection", "select_lag", "smoothed_loss",
    "argmin_name", "losses_at", "pearson", "rankdata", "recall_at_k", "regret",
    "relative_regret", "spearman", "step_correlation",
    "PolicyOutcome", "replay_lag", "replay_settle", "replay_sh", "settle_step", "sh_keep",
    "sh_rungs",
    "SELECTION_VERSION", "SelectionFile", "read_selection_json", "write_selection_json",
]
