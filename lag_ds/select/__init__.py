"""Selection over curves: LAG@k, selection.json, race policies, and the paper's analysis.

Knows only curves (numpy); see :mod:`lag_ds.select.lag` for the decision rule,
:mod:`lag_ds.select.policies` for SH/settle and replay, :mod:`lag_ds.select.landscape` and
:mod:`lag_ds.select.phase` for the Figure-3 analysis, :mod:`lag_ds.select.report` (numbers) and
:mod:`lag_ds.select.report_files` (markdown, figures, TensorBoard; imports matplotlib) for
``tools/analyze_lag.py``.
"""

from lag_ds.select.curves import DEFAULT_TAG, Curve, CurveSummary, load_curve, read_records
from lag_ds.select.lag import (
    NoEligibleCandidate,
    RankedCandidate,
    Selection,
    select_lag,
    smoothed_loss,
)
from lag_ds.select.landscape import (
    LossTable,
    StepStats,
    loss_table,
    self_correlation,
    smooth_centred,
    step_stats,
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
from lag_ds.select.phase import KProposal, propose_k_from_final, propose_k_from_self
from lag_ds.select.policies import (
    PolicyOutcome,
    lag_at_every_step,
    replay_lag,
    replay_settle,
    replay_sh,
    settle_step,
    sh_keep,
    sh_rungs,
    sh_trained_steps,
)
from lag_ds.select.selection_file import (
    SELECTION_VERSION,
    SelectionFile,
    read_selection_json,
    write_selection_json,
)
from lag_ds.select.strategies import StrategyRow, on_top_operators, strategy_table

__all__ = [
    "DEFAULT_TAG", "Curve", "CurveSummary", "load_curve", "read_records",
    "NoEligibleCandidate", "RankedCandidate", "Selection", "select_lag", "smoothed_loss",
    "argmin_name", "losses_at", "pearson", "rankdata", "recall_at_k", "regret",
    "relative_regret", "spearman", "step_correlation",
    "PolicyOutcome", "lag_at_every_step", "replay_lag", "replay_settle", "replay_sh",
    "settle_step", "sh_keep", "sh_rungs", "sh_trained_steps",
    "LossTable", "StepStats", "loss_table", "self_correlation", "smooth_centred", "step_stats",
    "KProposal", "propose_k_from_final", "propose_k_from_self",
    "StrategyRow", "on_top_operators", "strategy_table",
    "SELECTION_VERSION", "SelectionFile", "read_selection_json", "write_selection_json",
]
