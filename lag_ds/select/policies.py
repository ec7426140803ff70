"""Race policies over curves: LAG@k, successive halving (SH) and "settle", live and replayed.

LAG@k trains every candidate for k steps; that costs ``n * k`` candidate-steps.  Two cheaper
policies spend less on candidates that are clearly behind or stop the race once the ranking stops
moving.  This module holds their *decision rules* (pure functions the live race calls) and their
*replay* on finished curves (what a policy would have picked, when, at what cost and regret), so
the live policy and its offline evaluation share one implementation.

All steps here are **steps since growing** (``t = global step - base_step``).  Rules shared by all
policies: ties are broken by name (a resumed race reproduces its decision), and a non-finite loss
never survives a rung and never wins.

* ``sh_rungs``/``sh_keep``: successive halving.  At each rung ``min_steps * eta**i`` (< k) keep the
  ``ceil(n / eta)`` lowest losses; at ``k`` pick the lowest.  When a rung leaves a single survivor
  the race is decided there (nothing is left to compare; the survivor simply goes on training as
  the winner), so ``decided_at`` can be smaller than ``k``.
* ``settle_step``: stop at the first evaluation ``t >= floor`` where the candidates' Spearman rank
  correlation between each of the last ``m`` consecutive pairs of evaluations is ``>= tau`` (the
  ranking has settled, cf. the phase transition of paper Fig. 3); at the latest decide at ``cap``.
* Candidate-steps (compute spent on candidates until the decision): LAG@k ``n*k``; SH the sum over
  rung intervals of (candidates still training) x (interval length); settle ``n * decided_at``.

Example::

    >>> sh_rungs(40, min_steps=10, eta=3)
    (10, 30, 40)
    >>> sh_keep({"a": 2.0, "b": 1.0, "c": float("nan")}, eta=2)
    ('b', 'a')
    >>> settle_step({0: {"a": 3, "b": 2, "c": 1}, 10: {"a": 1, "b": 2, "c": 3},
    ...              20: {"a": 1, "b": 2, "c": 4}}, tau=0.9, m=1, floor=0, cap=100)
    20
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from lag_ds.select.curves import Curve
from lag_ds.select.lag import NoEligibleCandidate, select_lag
from lag_ds.select.metrics import regret, relative_regret, step_correlation

__all__ = [
    "PolicyOutcome",
    "lag_at_every_step",
    "replay_lag",
    "replay_settle",
    "replay_sh",
    "settle_step",
    "sh_keep",
    "sh_rungs",
    "sh_trained_steps",
]


def _check_int(value: object, *, name: str, minimum: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {value}")
    return value


def sh_rungs(k: int, *, min_steps: int, eta: int) -> tuple[int, ...]:
    """Successive-halving decision points: ``min_steps, eta*min_steps, eta**2*min_steps, ...``
    strictly below ``k``, then ``k`` (always last).

    Errors (``ValueError``): ``k, min_steps >= 1``, ``eta >= 2``, ``min_steps <= k``.
    """
    _check_int(k, name="k", minimum=1, where="sh_rungs")
    _check_int(min_steps, name="min_steps", minimum=1, where="sh_rungs")
    _check_int(eta, name="eta", minimum=2, where="sh_rungs")
    if min_steps > k:
        raise ValueError(f"sh_rungs: min_steps={min_steps} must be <= k={k}")
    rungs: list[int] = []
    r = min_steps
    while r < k:
        rungs.append(r)
        r *= eta
    rungs.append(k)
    return tuple(rungs)


def _finite(x: float) -> bool:
    """A real number (numpy scalars included, bool not) that is neither NaN nor +-inf."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def sh_keep(losses: Mapping[str, float], *, eta: int) -> tuple[str, ...]:
    """Survivors of one rung: the ``ceil(n/eta)`` lowest finite losses (``n`` = number of
    candidates given, non-finite ones included), sorted by ``(loss, name)``.

    At least one survivor if any loss is finite; none if none is.  Empty ``losses`` is an error.
    """
    _check_int(eta, name="eta", minimum=2, where="sh_keep")
    if not losses:
        raise ValueError("sh_keep: losses is empty")
    keep = -(-len(losses) // eta)  # ceil(n / eta) >= 1
    ranked = sorted((float(v), name) for name, v in losses.items() if _finite(v))
    return tuple(name for _, name in ranked[:keep])


def _alive(losses_by_step: Mapping[int, Mapping[str, float]]) -> list[tuple[int, frozenset]]:
    """``(t, candidates finite at every evaluation up to t)`` for each evaluation, in order."""
    out: list[tuple[int, frozenset]] = []
    alive: frozenset | None = None
    for t in sorted(losses_by_step):
        finite_now = frozenset(n for n, v in losses_by_step[t].items() if _finite(v))
        alive = finite_now if alive is None else alive & finite_now
        out.append((t, alive))
    return out


def _settled(losses_by_step: Mapping[int, Mapping[str, float]], steps: list[int],
             names: frozenset, *, tau: float) -> bool:
    """Spearman over ``names`` between each consecutive pair of ``steps`` is ``>= tau``."""
    if len(names) < 2:
        return False  # undefined with fewer than 2 candidates
    for a, b in zip(steps, steps[1:]):
        rho = step_correlation({n: losses_by_step[a][n] for n in names},
                               {n: losses_by_step[b][n] for n in names})
        if not rho >= tau:  # NaN (constant losses) is not settled
            return False
    return True


def settle_step(losses_by_step: Mapping[int, Mapping[str, float]], *, tau: float, m: int,
                floor: int, cap: int) -> int | None:
    """The "settle" policy's decision step, or ``None`` to keep training.

    Evaluation steps are the sorted keys; only candidates present (and finite) at every evaluation
    used so far count.  Returns the first evaluation step ``t >= floor`` such that the Spearman
    correlation (over the candidates that count at ``t``) between each of the last ``m``
    consecutive pairs of evaluations ending at ``t`` is ``>= tau`` (an undefined correlation --
    constant losses, fewer than 2 candidates -- is not settled); else ``cap`` once an evaluation
    at a step ``>= cap`` exists; else ``None``.
    """
    if not isinstance(tau, numbers.Real) or isinstance(tau, bool) or not -1.0 <= tau <= 1.0:
        raise ValueError(f"settle_step: tau must be a number in [-1, 1], got {tau!r}")
    _check_int(m, name="m", minimum=1, where="settle_step")
    _check_int(floor, name="floor", minimum=0, where="settle_step")
    _check_int(cap, name="cap", minimum=0, where="settle_step")
    if cap < floor:
        raise ValueError(f"settle_step: cap={cap} must be >= floor={floor}")
    steps = sorted(losses_by_step)
    for j, (t, alive) in enumerate(_alive(losses_by_step)):
        if t >= floor and j >= m and _settled(losses_by_step, steps[j - m:j + 1], alive,
                                              tau=tau):
            return min(t, cap)
        if t >= cap:
            return cap
    return None


@dataclass(frozen=True, kw_only=True)
class PolicyOutcome:
    """What a policy picked on given curves, when, at what cost, and how well (if finals known)."""

    policy: str
    """E.g. ``"LAG@40"``, ``"SH(eta=3,r0=10,k=40)"``, ``"settle(tau=0.9,m=3)"``."""
    pick: str
    decided_at: int
    """Steps since growing at which the pick was made."""
    candidate_steps: int
    """Training steps spent on all candidates until the decision."""
    regret: float | None
    """Eq. 1 vs ``final_losses``; ``None`` without finals or if the pick has no final loss."""
    relative_regret: float | None


def _judge(final_losses: Mapping[str, float] | None, pick: str) -> tuple[float | None,
                                                                          float | None]:
    if final_losses is None or pick not in final_losses:
        return None, None
    return regret(final_losses, chosen=pick), relative_regret(final_losses, chosen=pick)


def _check_curves(curves: Mapping[str, Curve], *, where: str) -> None:
    if not curves:
        raise ValueError(f"{where}: no curves given")
    for name, curve in curves.items():
        if curve.name != name:
            raise ValueError(f"{where}: curves[{name!r}] is named {curve.name!r}")


def _loss_since(curve: Curve, *, base_step: int, t: int) -> float:
    """Loss at ``base_step + t``; NaN if there is no point there or any point in
    ``[base_step, base_step + t]`` is non-finite (a diverged run never comes back)."""
    seen = curve.window(start=base_step, stop=base_step + t)
    if not seen.has_step(base_step + t) or seen.first_non_finite_step() is not None:
        return math.nan
    return seen.value_at(base_step + t)


def replay_lag(curves: Mapping[str, Curve], *, base_step: int, k: int, smoothing_window: int = 1,
               final_losses: Mapping[str, float] | None = None) -> PolicyOutcome:
    """LAG@k on curves that may go on past ``k``: only points in ``[base_step, base_step + k]``
    are seen (a NaN after ``k`` was unknown at decision time).  Cost ``n * k``."""
    _check_curves(curves, where="replay_lag")
    seen = {n: c.window(start=base_step, stop=base_step + k) for n, c in curves.items()}
    sel = select_lag(seen, k=k, base_step=base_step, smoothing_window=smoothing_window)
    name = f"LAG@{k}" if smoothing_window == 1 else f"LAG@{k}(w={smoothing_window})"
    r, rr = _judge(final_losses, sel.winner)
    return PolicyOutcome(policy=name, pick=sel.winner, decided_at=k,
                         candidate_steps=len(curves) * k, regret=r, relative_regret=rr)


def lag_at_every_step(curves: Mapping[str, Curve], *, base_step: int, smoothing_window: int = 1,
                      final_losses: Mapping[str, float] | None = None,
                      ) -> dict[int, PolicyOutcome | None]:
    """:func:`replay_lag` for every evaluated ``t >= 0`` at once (``None`` where no candidate is
    eligible), in one pass per curve instead of one ``select_lag`` per step: same eligibility
    (a point at ``t``, no non-finite point in ``[base_step, base_step + t]``), same trailing mean,
    same tie-break by name."""
    _check_curves(curves, where="lag_at_every_step")
    _check_int(smoothing_window, name="smoothing_window", minimum=1, where="lag_at_every_step")
    names = sorted(curves)
    seen = [curves[n].window(start=base_step, stop=np.iinfo(np.int64).max) for n in names]
    steps = np.array(sorted({int(s) for c in seen for s in c.steps}), dtype=np.int64)
    score = np.full((steps.size, len(names)), np.nan)
    for j, c in enumerate(seen):
        bad = np.flatnonzero(~np.isfinite(c.values))
        good = int(bad[0]) if bad.size else len(c)
        rows = np.searchsorted(steps, c.steps[:good])
        w = smoothing_window
        score[rows, j] = [float(np.mean(c.values[max(0, i - w + 1):i + 1])) for i in range(good)]
    out: dict[int, PolicyOutcome | None] = {}
    name = "LAG@{}" if smoothing_window == 1 else "LAG@{}" + f"(w={smoothing_window})"
    for i, step in enumerate(steps):
        t = int(step) - base_step
        row = score[i]
        if np.isnan(row).all():
            out[t] = None
            continue
        pick = names[int(np.nanargmin(row))]  # first minimum = smallest name among ties
        r, rr = _judge(final_losses, pick)
        out[t] = PolicyOutcome(policy=name.format(t), pick=pick, decided_at=t,
                               candidate_steps=len(curves) * t, regret=r, relative_regret=rr)
    return out


def sh_trained_steps(curves: Mapping[str, Curve], *, base_step: int, k: int, min_steps: int,
                     eta: int) -> tuple[str, dict[str, int]]:
    """Successive halving on curves: ``(pick, {candidate: steps since growing it trained})``.

    Every candidate trains to the rung that eliminates it; the survivors to the decision step
    (``k``, or the rung that left one survivor).  The loss at a rung is non-finite if the curve
    has no point there or any non-finite point before it.  :class:`NoEligibleCandidate` if a rung
    has no finite loss at all.
    """
    _check_curves(curves, where="sh_trained_steps")
    alive = tuple(sorted(curves))
    trained: dict[str, int] = {}
    for r in sh_rungs(k, min_steps=min_steps, eta=eta):
        losses = {n: _loss_since(curves[n], base_step=base_step, t=r) for n in alive}
        kept = sh_keep(losses, eta=eta) if r < k else sh_keep(losses, eta=eta)[:1]
        if not kept:
            raise NoEligibleCandidate(f"replay_sh: no finite loss at rung t={r} "
                                      f"(step {base_step + r}; a validation point is needed at "
                                      "every rung)")
        trained.update({n: r for n in alive if n not in kept})
        alive = kept
        if len(alive) == 1:
            trained[alive[0]] = r
            break
    return alive[0], trained


def replay_sh(curves: Mapping[str, Curve], *, base_step: int, k: int, min_steps: int, eta: int,
              final_losses: Mapping[str, float] | None = None) -> PolicyOutcome:
    """Successive halving replayed: rungs from :func:`sh_rungs`, survivors from :func:`sh_keep`
    on the loss at each rung (missing point or earlier NaN = non-finite), lowest loss at ``k``
    wins; decided early if a rung leaves one survivor.  Cost: the sum of
    :func:`sh_trained_steps`."""
    pick, trained = sh_trained_steps(curves, base_step=base_step, k=k, min_steps=min_steps,
                                     eta=eta)
    r_, rr = _judge(final_losses, pick)
    return PolicyOutcome(policy=f"SH(eta={eta},r0={min_steps},k={k})", pick=pick,
                         decided_at=trained[pick], candidate_steps=sum(trained.values()),
                         regret=r_, relative_regret=rr)


def replay_settle(curves: Mapping[str, Curve], *, base_step: int, tau: float, m: int, floor: int,
                  cap: int, final_losses: Mapping[str, float] | None = None) -> PolicyOutcome:
    """The settle policy replayed on every evaluation step ``>= base_step``; the pick is the lowest
    loss (among candidates finite at every evaluation so far) at the evaluation that triggered the
    decision (the first one ``>= cap`` when capped).  ``ValueError`` if the curves end first."""
    _check_curves(curves, where="replay_settle")
    steps = sorted({int(s) - base_step for c in curves.values() for s in c.steps
                    if s >= base_step})
    by_step = {t: {n: c.value_at(base_step + t) for n, c in curves.items()
                   if c.has_step(base_step + t)} for t in steps}
    decided = settle_step(by_step, tau=tau, m=m, floor=floor, cap=cap)
    if decided is None:
        last = steps[-1] if steps else None
        raise ValueError(f"replay_settle: curves end at t={last} before the ranking settled "
                         f"or cap={cap} was reached")
    trigger, alive = next((t, a) for t, a in _alive(by_step) if t >= decided)
    if not alive:
        raise NoEligibleCandidate(f"replay_settle: no candidate finite at every evaluation up "
                                  f"to t={trigger}")
    pick = min(alive, key=lambda n: (by_step[trigger][n], n))
    r, rr = _judge(final_losses, pick)
    return PolicyOutcome(policy=f"settle(tau={tau:g},m={m})", pick=pick, decided_at=decided,
                         candidate_steps=len(curves) * decided, regret=r, relative_regret=rr)
