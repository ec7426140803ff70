"""The early loss landscape after growing (paper section 3.3, Figure 3), computed from curves.

"Does LAG choose well?" is answered by watching, step by step after growing, how well the
candidates' validation losses predict their final losses.  This module lays the candidates'
curves out as one table (steps since growing x candidates) and computes, per step ``t``:

* Spearman and Pearson correlation of the loss at ``t`` with the final loss (Fig. 3 top right);
* which candidate is lowest at ``t`` and the regret / relative regret of picking it (eqs. 1-2,
  Fig. 3 bottom right), and recall@{1,2,3} of the final-best candidate (Fig. 3 bottom left);

and the self-correlation matrix (Spearman between every pair of steps, Fig. 3 top left).

Choices, and why:

* Steps are **steps since growing** (``t = step - base_step``); points before ``base_step`` belong
  to the smaller model and are ignored.
* A curve holding any NaN/inf in the analysed range is **left out of the whole analysis**, with
  the reason: a diverged run has no meaningful rank, and mixing it in at early steps only would
  make the correlations at different ``t`` describe different sets of candidates.
* A candidate **without a point at** ``t`` is left out at ``t`` only (``num_candidates`` says how
  many were used); correlations between two steps use the candidates present at both.
* Smoothing is the paper's centred moving average over ``w`` (odd) consecutive *points* of each
  curve, truncated at both ends of the analysed range (fewer points near ``t=0`` and the last
  step).  Final losses are always raw values.
* With fewer than 2 candidates, or constant losses, a correlation is undefined: ``None`` (never a
  crash, never a made-up 0).

Example::

    >>> table = loss_table(curves, base_step=300_000, smoothing_window=11)    # doctest: +SKIP
    >>> stats = step_stats(table, final_losses={"a": 2.12, "b": 2.14})       # doctest: +SKIP
    >>> stats[0].spearman_final, stats[-1].relative_regret                   # doctest: +SKIP
    (-0.42, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lag_ds.select.curves import Curve
from lag_ds.select.metrics import pearson, rankdata, regret, relative_regret, spearman

__all__ = ["LossTable", "StepStats", "loss_table", "self_correlation", "smooth_centred",
           "step_stats"]

RECALL_TOP_K = (1, 2, 3)


def smooth_centred(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` (odd) points, truncated at both ends."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"smooth_centred: window must be an odd int >= 1, got {window!r}")
    values = np.asarray(values, dtype=np.float64)
    if window == 1 or values.size == 0:
        return values.copy()
    half = window // 2
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(values.size)
    lo = np.maximum(idx - half, 0)
    hi = np.minimum(idx + half + 1, values.size)
    return (csum[hi] - csum[lo]) / (hi - lo)


@dataclass(frozen=True, kw_only=True, eq=False)
class LossTable:
    """Candidates' losses on the union of their evaluation steps; NaN = no point there."""

    steps: np.ndarray
    """Steps since growing, strictly increasing (int64)."""
    names: tuple[str, ...]
    """Candidates in the table (sorted), i.e. not excluded."""
    losses: np.ndarray
    """``losses[i, j]``: (smoothed) loss of ``names[j]`` at ``steps[i]``; NaN if no point."""
    excluded: Mapping[str, str]
    """Candidate -> why it is not in the table."""
    smoothing_window: int

    def at(self, i: int) -> dict[str, float]:
        """``{name: loss}`` at ``steps[i]`` for the candidates with a point there."""
        row = self.losses[i]
        return {n: float(v) for n, v in zip(self.names, row) if not math.isnan(v)}


def loss_table(curves: Mapping[str, Curve], *, base_step: int, stop: int | None = None,
               smoothing_window: int = 1) -> LossTable:
    """Lay out the points with ``base_step <= step <= stop`` (global steps; ``stop=None``: all).

    Curves holding NaN/inf there, and curves without any point there, are excluded (with reason).
    """
    if not curves:
        raise ValueError("loss_table: no curves given")
    smooth_centred(np.zeros(0), smoothing_window)  # validates the window
    stop = np.iinfo(np.int64).max if stop is None else stop
    kept: dict[str, Curve] = {}
    excluded: dict[str, str] = {}
    for name in sorted(curves):
        if curves[name].name != name:
            raise ValueError(f"loss_table: curves[{name!r}] is named {curves[name].name!r}")
        seen = curves[name].window(start=base_step, stop=stop)
        bad = seen.first_non_finite_step()
        if len(seen) == 0:
            excluded[name] = f"no validation point in steps {base_step}..{stop}"
        elif bad is not None:
            excluded[name] = (f"non-finite loss at step {bad} (t={bad - base_step}): "
                              "a diverged run has no meaningful rank")
        else:
            kept[name] = seen
    steps = np.array(sorted({int(s) for c in kept.values() for s in c.steps}), dtype=np.int64)
    losses = np.full((steps.size, len(kept)), np.nan)
    for j, curve in enumerate(kept.values()):
        rows = np.searchsorted(steps, curve.steps)
        losses[rows, j] = smooth_centred(curve.values, smoothing_window)
    steps = steps - base_step
    steps.setflags(write=False)
    losses.setflags(write=False)
    return LossTable(steps=steps, names=tuple(kept), losses=losses, excluded=excluded,
                     smoothing_window=smoothing_window)


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


@dataclass(frozen=True, kw_only=True)
class StepStats:
    """Everything the analysis says about one evaluation step ``t`` (steps since growing)."""

    t: int
    num_candidates: int
    """Candidates with a point at ``t`` (and a final loss, when finals are given)."""
    pick: str | None
    """Lowest loss at ``t`` (ties by name); ``None`` if no candidate has a point at ``t``."""
    spearman_final: float | None = None
    pearson_final: float | None = None
    regret: float | None = None
    relative_regret: float | None = None
    recall: Mapping[int, bool | None] | None = None
    """top-k -> whether the final-best is among the k lowest at ``t``; ``None`` for a k when the
    final-best has no point at ``t``; ``None`` without finals."""


def step_stats(table: LossTable, *,
               final_losses: Mapping[str, float] | None = None) -> tuple[StepStats, ...]:
    """Per-step statistics.  With ``final_losses`` only candidates that have a finite final loss
    are used (the others cannot be judged); without, only ``pick`` and ``num_candidates``."""
    if final_losses is not None:
        bad = sorted(n for n, v in final_losses.items() if not math.isfinite(v))
        if bad:
            raise ValueError(f"step_stats: non-finite final loss for {bad}")
        finals = {n: float(v) for n, v in final_losses.items() if n in table.names}
        best = min(finals.items(), key=lambda kv: (kv[1], kv[0]))[0] if finals else None
    out = []
    for i, t in enumerate(table.steps):
        here = table.at(i)
        if final_losses is None:
            pick = min(here.items(), key=lambda kv: (kv[1], kv[0]))[0] if here else None
            out.append(StepStats(t=int(t), num_candidates=len(here), pick=pick))
            continue
        here = {n: v for n, v in here.items() if n in finals}
        ranked = [n for n, _ in sorted(here.items(), key=lambda kv: (kv[1], kv[0]))]
        pick = ranked[0] if ranked else None
        rho = r = math.nan
        if len(ranked) >= 2:
            x = np.array([here[n] for n in ranked])
            y = np.array([finals[n] for n in ranked])
            rho, r = spearman(x, y), pearson(x, y)
        recall = {k: (best in ranked[:k]) if best in here else None for k in RECALL_TOP_K}
        out.append(StepStats(
            t=int(t), num_candidates=len(ranked), pick=pick,
            spearman_final=_none_if_nan(rho), pearson_final=_none_if_nan(r),
            regret=regret(finals, chosen=pick) if pick else None,
            relative_regret=relative_regret(finals, chosen=pick) if pick else None,
            recall=recall,
        ))
    return tuple(out)


def _row_ranks(block: np.ndarray) -> np.ndarray:
    """Ranks (average for ties) within each row, centred, of a NaN-free block."""
    ranks = np.stack([rankdata(row) for row in block]) if block.size else block
    return ranks - ranks.mean(axis=1, keepdims=True)


def self_correlation(table: LossTable, *, rows: Sequence[int] | None = None) -> np.ndarray:
    """Spearman correlation between the losses at every pair of the table's steps.

    ``rows`` selects table rows (default: all).  Entry ``[a, b]`` uses the candidates with a
    point at both steps; NaN where that is fewer than 2 or either side is constant.
    """
    idx = np.arange(table.steps.size) if rows is None else np.asarray(rows, dtype=np.int64)
    block = table.losses[idx]
    n = idx.size
    if not np.isnan(block).any():  # common case: one vectorised pass
        if block.shape[1] < 2:
            return np.full((n, n), np.nan)
        c = _row_ranks(block)
        norms = np.sqrt((c * c).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            m = (c @ c.T) / np.outer(norms, norms)
        m[(norms == 0)[:, None] | (norms == 0)[None, :]] = np.nan
        return np.clip(m, -1.0, 1.0)
    m = np.full((n, n), np.nan)
    for a in range(n):
        for b in range(a, n):
            both = ~np.isnan(block[a]) & ~np.isnan(block[b])
            if both.sum() >= 2:
                m[a, b] = m[b, a] = spearman(block[a, both], block[b, both])
    return m
