"""Analysis metrics of paper section 3.3: regret, relative regret, correlation, recall@k.

These judge a selection rule after the fact, once every candidate's *final* loss is known (the
paper trains all 30 operators to the end to draw Figure 3 and Tables 1-2).  They work on plain
``{candidate: loss}`` mappings so a report can feed them from curves, from a CSV, or from the
paper's tables.

* regret (eq. 1): ``l(G_i) - l_min`` -- how much final loss the pick at step i gives up.
* relative regret (eq. 2): ``(l(G_i) - l_min) / (l_max - l_min)`` -- the same, as a fraction of
  the spread of the design space (0 = oracle, 1 = the worst operator).
* Spearman / Pearson correlation between the candidates' losses at two steps (Figure 3 heatmap).
* recall@k: is the final-best candidate among the k lowest at step i (Figure 3, bottom left).

Example::

    >>> final = {"a": 1.7461, "b": 1.7875, "c": 1.7979}
    >>> round(regret(final, chosen="b"), 4), round(relative_regret(final, chosen="b"), 4)
    (0.0414, 0.7992)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from lag_ds.select.curves import Curve


def _finite_losses(losses: Mapping[str, float], *, what: str) -> dict[str, float]:
    if not losses:
        raise ValueError(f"{what}: no losses given")
    bad = [name for name, v in losses.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what}: non-finite loss for {sorted(bad)}")
    return dict(losses)


def regret(final_losses: Mapping[str, float], *, chosen: str) -> float:
    """Eq. 1: final loss of ``chosen`` minus the best final loss in the design space."""
    final = _finite_losses(final_losses, what="regret")
    if chosen not in final:
        raise ValueError(f"regret: chosen candidate {chosen!r} has no final loss")
    return final[chosen] - min(final.values())


def relative_regret(final_losses: Mapping[str, float], *, chosen: str) -> float:
    """Eq. 2: regret divided by the spread ``l_max - l_min``.

    With a spread of zero every choice is optimal, so the relative regret is 0 by definition.
    """
    final = _finite_losses(final_losses, what="relative_regret")
    spread = max(final.values()) - min(final.values())
    r = regret(final, chosen=chosen)
    return 0.0 if spread == 0 else r / spread


def argmin_name(losses: Mapping[str, float]) -> str:
    """The candidate with the lowest loss, ties broken by name (as :func:`select_lag` does)."""
    finite = _finite_losses(losses, what="argmin_name")
    return min(finite.items(), key=lambda kv: (kv[1], kv[0]))[0]


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (what Spearman's rho needs)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(values.size, dtype=np.float64)
    sorted_vals = values[order]
    i = 0
    while i < values.size:
        j = i
        while j + 1 < values.size and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (correlation is undefined)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"pearson: need two 1-D arrays of equal length >= 2, "
                         f"got {x.shape}, {y.shape}")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return math.nan if denom == 0 else float(dx @ dy) / denom


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks)."""
    return pearson(rankdata(x), rankdata(y))


def losses_at(curves: Mapping[str, Curve], step: int) -> dict[str, float]:
    """``{name: loss at step}`` for every curve with a point at ``step``."""
    return {name: c.value_at(step) for name, c in curves.items() if c.has_step(step)}


def step_correlation(a: Mapping[str, float], b: Mapping[str, float], *,
                     method: str = "spearman") -> float:
    """Correlation between two steps' losses over the candidates present in both."""
    names = sorted(set(a) & set(b))
    if len(names) < 2:
        raise ValueError(f"step_correlation: need >= 2 common candidates, got {len(names)}")
    x = np.array([a[n] for n in names])
    y = np.array([b[n] for n in names])
    if method == "spearman":
        return spearman(x, y)
    if method == "pearson":
        return pearson(x, y)
    raise ValueError(f"step_correlation: method must be 'spearman' or 'pearson', got {method!r}")


def recall_at_k(losses_at_step: Mapping[str, float], final_losses: Mapping[str, float], *,
                top_k: int) -> bool:
    """Whether the final-best candidate is among the ``top_k`` lowest losses at this step."""
    if top_k < 1:
        raise ValueError(f"recall_at_k: top_k must be >= 1, got {top_k}")
    best = argmin_name(final_losses)
    ranked = sorted(_finite_losses(losses_at_step, what="recall_at_k").items(),
                    key=lambda kv: (kv[1], kv[0]))
    return best in {name for name, _ in ranked[:top_k]}
