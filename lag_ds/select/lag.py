"""LAG@k: pick the growth operator with the lowest validation loss k steps after growing.

Paper section 4.1: train every grown candidate for k steps, choose the one with the lowest
validation loss at step k, continue only that one.  LAG@0 -- the loss right after growing, i.e.
the "loss-preservation" heuristic the paper argues against -- is computed alongside, so every
``selection.json`` also says what the classical rule would have picked.

Choices made here, and why:

* Steps in metrics files are global; the decision step is ``base_step + k``.  A candidate needs a
  validation point exactly there: a point "close by" would compare candidates at different
  amounts of training, which is the one thing LAG must not do.
* Optional trailing smoothing (``smoothing_window`` = w): the score is the mean of the last w
  validation points in ``[base_step, base_step + k]``.  The window is clipped at ``base_step``
  because points before growing belong to the smaller model.  (The paper smooths its analysis
  plots with a centred 11-step window; a selector running live cannot look ahead, hence trailing.)
* Excluded, each with a reason: candidates in ``failed`` (from the launcher), curves holding any
  NaN/inf (a diverging run is never promoted), and curves without a point at the decision step.
* Ties are broken by name so that the same curves always give the same winner (a resumed
  orchestrator must reproduce the decision).

Example::

    >>> sel = select_lag(curves, k=2000, base_step=300_000)         # doctest: +SKIP
    >>> sel.winner, sel.lag0_winner                                  # doctest: +SKIP
    ('dup_last_4', 'zero_init_4')
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from lag_ds.select.curves import Curve, CurveSummary


class NoEligibleCandidate(ValueError):
    """Every candidate was excluded; the message lists why, candidate by candidate."""


@dataclass(frozen=True, kw_only=True)
class RankedCandidate:
    """One row of the LAG@k ranking (rank 1 is the winner)."""

    name: str
    rank: int
    lag_k_loss: float
    """(Smoothed) validation loss at ``base_step + k``."""
    lag_0_loss: float | None
    """Validation loss at ``base_step``; ``None`` if the curve has no point there."""


@dataclass(frozen=True, kw_only=True)
class Selection:
    """The outcome of one LAG@k decision, everything ``selection.json`` stores but the seed."""

    winner: str
    k: int
    base_step: int
    smoothing_window: int
    ranking: tuple[RankedCandidate, ...]
    excluded: Mapping[str, str]
    """Candidate name -> why it was not ranked."""
    lag0_winner: str | None
    """Lowest loss at ``base_step`` among non-failed candidates; ``None`` if none has a point."""
    summaries: Mapping[str, CurveSummary] = field(default_factory=dict)
    """Curve summary of every candidate that had a curve."""

    @property
    def decision_step(self) -> int:
        return self.base_step + self.k


def smoothed_loss(curve: Curve, *, step: int, base_step: int, smoothing_window: int) -> float:
    """Mean of the last ``smoothing_window`` points in ``[base_step, step]``; the point at
    ``step`` itself must exist (``KeyError`` otherwise)."""
    if smoothing_window < 1:
        raise ValueError(f"smoothed_loss: smoothing_window must be >= 1, got {smoothing_window}")
    curve.value_at(step)  # raises KeyError when the decision point is missing
    window = curve.window(start=base_step, stop=step).values[-smoothing_window:]
    return float(np.mean(window))


def _exclusion_reason(curve: Curve | None, *, step: int) -> str | None:
    if curve is None:
        return "no curve"
    if len(curve) == 0:
        return "no validation points"
    bad = curve.first_non_finite_step()
    if bad is not None:
        return f"non-finite loss at step {bad}"
    if not curve.has_step(step):
        return f"no validation point at step {step} (last step {int(curve.steps[-1])})"
    return None


def select_lag(
    curves: Mapping[str, Curve],
    *,
    k: int,
    base_step: int,
    smoothing_window: int = 1,
    failed: Mapping[str, str] | None = None,
    stopped: Mapping[str, str] | None = None,
) -> Selection:
    """Rank candidates by (smoothed) validation loss at ``base_step + k``; lowest wins.

    ``curves`` maps candidate name to its validation curve (global steps); ``failed`` maps
    candidates the launcher marked failed to the launcher's reason -- they are never ranked, even
    if their curve looks fine, since their run did not complete the k steps as specified.
    ``stopped`` maps candidates a race policy stopped early (successive halving) to why: they
    are not ranked at ``k`` either, but LAG@0 still considers them (they had a loss right after
    growing like everybody else).
    Raises :class:`NoEligibleCandidate` if nothing is left to rank.
    """
    failed = dict(failed or {})
    stopped = dict(stopped or {})
    if k < 0:
        raise ValueError(f"select_lag: k must be >= 0, got {k}")
    if smoothing_window < 1:
        raise ValueError(f"select_lag: smoothing_window must be >= 1, got {smoothing_window}")
    if not curves and not failed:
        raise ValueError("select_lag: no candidates given")
    for name, curve in curves.items():
        if curve.name != name:
            raise ValueError(f"select_lag: curves[{name!r}] is named {curve.name!r}")

    step = base_step + k
    names = sorted(set(curves) | set(failed) | set(stopped))
    excluded: dict[str, str] = {}
    scored: list[tuple[float, str]] = []
    lag0: dict[str, float | None] = {}
    for name in names:
        curve = curves.get(name)
        if curve is not None and curve.has_step(base_step):
            lag0[name] = curve.value_at(base_step)
        else:
            lag0[name] = None
        if name in failed:
            excluded[name] = f"failed: {failed[name]}"
            continue
        if name in stopped:
            excluded[name] = f"stopped: {stopped[name]}"
            continue
        reason = _exclusion_reason(curve, step=step)
        if reason is not None:
            excluded[name] = reason
            continue
        assert curve is not None
        loss = smoothed_loss(curve, step=step, base_step=base_step,
                             smoothing_window=smoothing_window)
        scored.append((loss, name))

    if not scored:
        detail = "; ".join(f"{n}: {r}" for n, r in excluded.items())
        raise NoEligibleCandidate(f"select_lag: no eligible candidate at step {step} ({detail})")

    scored.sort()  # by loss, then by name: deterministic
    ranking = tuple(
        RankedCandidate(name=name, rank=i + 1, lag_k_loss=loss, lag_0_loss=lag0[name])
        for i, (loss, name) in enumerate(scored)
    )
    # LAG@0 looks only at step base_step: it cannot know about later NaNs, only about crashes.
    lag0_pool = sorted(
        (loss, name) for name, loss in lag0.items()
        if loss is not None and math.isfinite(loss) and name not in failed
    )
    return Selection(
        winner=ranking[0].name,
        k=k,
        base_step=base_step,
        smoothing_window=smoothing_window,
        ranking=ranking,
        excluded=excluded,
        lag0_winner=lag0_pool[0][1] if lag0_pool else None,
        summaries={name: CurveSummary.of(curves[name]) for name in sorted(curves)},
    )
