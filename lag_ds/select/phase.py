"""Proposing k for LAG@k from the phase transition of the early landscape (paper 3.3, 4.1).

The paper looks at the self-correlation heatmap, sees the ranking of the candidates become stable
after a short "fast adaptation" phase (near step 50 for BERT, near 1000 for UL2), and picks k with
a margin past it (200 and 2000).  Here that judgement is a stated rule, so a report can say which
rule produced its k:

* **final-correlation** (a study run, final losses known): the transition is the earliest
  evaluated ``t`` from which the Spearman correlation with the final loss stays ``>= threshold``
  at every later evaluated step (an undefined correlation breaks the run).
* **self-correlation** (a race-only run, no finals): the earliest evaluated ``t``, with at least
  one later evaluation, whose Spearman correlation with *every* later evaluated step in the
  window is ``>= threshold``.
* **margin**: ``k = ceil(margin * transition)`` rounded up to the next evaluated step, so that a
  LAG@k decision has a validation point at ``k`` (default margin 2, the paper's UL2 choice: 1000
  -> 2000).  If no evaluated step is that late, ``k`` is still proposed and ``covered`` is false:
  the data end before the margin does.

Example::

    >>> propose_k_from_final([0, 10, 20, 30], [-0.4, 0.95, 0.8, 0.97], threshold=0.9)
    KProposal(rule='final-correlation', threshold=0.9, margin=2.0, transition=30, k=60, \
covered=False)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_MARGIN", "DEFAULT_THRESHOLD", "KProposal", "propose_k_from_final",
           "propose_k_from_self"]

DEFAULT_THRESHOLD = 0.9
DEFAULT_MARGIN = 2.0


@dataclass(frozen=True, kw_only=True)
class KProposal:
    """A proposed k and the rule that produced it (``transition``/``k`` are steps since growing;
    both ``None`` when the correlation never settles in the data)."""

    rule: str
    """``"final-correlation"`` or ``"self-correlation"``."""
    threshold: float
    margin: float
    transition: int | None
    k: int | None
    covered: bool
    """Whether an evaluated step ``>= ceil(margin * transition)`` exists (``k`` is evaluated)."""

    def describe(self) -> str:
        """One plain-language sentence for reports."""
        what = ("Spearman correlation with the final loss" if self.rule == "final-correlation"
                else "Spearman correlation with every later evaluated step")
        if self.transition is None:
            return (f"{self.rule}: the {what} never stays >= {self.threshold:g} in the data; "
                    "no k proposed")
        where = ("rounded up to an evaluated step" if self.covered
                 else "beyond the last evaluated step: the data do not cover the margin")
        return (f"{self.rule}: the {what} stays >= {self.threshold:g} from t={self.transition}; "
                f"k = {self.margin:g} x {self.transition} -> {self.k} ({where})")


def _check(threshold: float, margin: float, *, where: str) -> None:
    if not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"{where}: threshold must be in [-1, 1], got {threshold!r}")
    if not isinstance(margin, (int, float)) or not margin >= 1.0:
        raise ValueError(f"{where}: margin must be >= 1, got {margin!r}")


def _with_margin(steps: Sequence[int], transition: int | None, *, rule: str, threshold: float,
                 margin: float) -> KProposal:
    if transition is None:
        return KProposal(rule=rule, threshold=threshold, margin=margin, transition=None, k=None,
                         covered=False)
    want = math.ceil(margin * transition)
    later = [s for s in steps if s >= want]
    return KProposal(rule=rule, threshold=threshold, margin=margin, transition=int(transition),
                     k=int(min(later)) if later else int(want), covered=bool(later))


def _check_steps(steps: Sequence[int], n: int, *, where: str) -> list[int]:
    steps = [int(s) for s in steps]
    if len(steps) != n:
        raise ValueError(f"{where}: {len(steps)} steps for {n} values")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"{where}: steps must be strictly increasing")
    return steps


def propose_k_from_final(steps: Sequence[int], spearman_final: Sequence[float | None], *,
                         threshold: float = DEFAULT_THRESHOLD,
                         margin: float = DEFAULT_MARGIN) -> KProposal:
    """k from the correlation-with-final curve (``None``/NaN entries count as below threshold)."""
    _check(threshold, margin, where="propose_k_from_final")
    steps = _check_steps(steps, len(spearman_final), where="propose_k_from_final")
    transition = None
    for t, rho in zip(reversed(steps), reversed(list(spearman_final))):
        if rho is None or not rho >= threshold:
            break
        transition = t
    return _with_margin(steps, transition, rule="final-correlation", threshold=threshold,
                        margin=margin)


def propose_k_from_self(steps: Sequence[int], matrix: np.ndarray, *,
                        threshold: float = DEFAULT_THRESHOLD,
                        margin: float = DEFAULT_MARGIN) -> KProposal:
    """k from a self-correlation matrix over ``steps`` (as :func:`self_correlation` returns)."""
    _check(threshold, margin, where="propose_k_from_self")
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"propose_k_from_self: matrix must be square, got {matrix.shape}")
    steps = _check_steps(steps, matrix.shape[0], where="propose_k_from_self")
    transition = None
    for i in range(len(steps) - 1):  # the last step has no later step to agree with
        later = matrix[i, i + 1:]
        if np.all(later >= threshold):  # NaN compares False: undefined breaks it
            transition = steps[i]
            break
    return _with_margin(steps, transition, rule="self-correlation", threshold=threshold,
                        margin=margin)
