"""The race of one growth stage: train candidates on slices until a policy decides.

Three policies, each a sequence of *rounds*; a round is one :func:`lag_ds.launch.run_jobs` call
(journaled, resumable, waves over the slices) that trains some candidates up to a target step,
where each job saves a checkpoint, so the next round resumes them from it:

* ``lag`` (paper section 4.1): one round, every candidate to ``base + k``; LAG@k decides.
* ``sh`` (successive halving): rounds at the rungs r0, eta*r0, eta**2*r0, ... < k, then k; after
  each rung only the best ceil(n/eta) by validation loss go on, the others stop there (their
  curves stay); the winner is LAG@k among the last rung's survivors, or the single survivor of
  an earlier rung (decided there, as :func:`lag_ds.select.policies.replay_sh` does).
* ``settle``: every candidate advances ``chunk`` steps per round (from ``floor``) until the
  candidates' ranking has settled -- the Spearman correlation between consecutive evaluations
  is >= tau for m evaluations in a row (the paper's phase transition, detected live) -- or
  ``cap`` is reached; the winner is the lowest loss at the step where it settled.

Why rounds of whole jobs and not live stopping: a rung compares candidates at the same step, and
with more candidates than slices they reach it in waves; a round boundary is the one place where
every survivor has a checkpoint and a validation point at that step.  A killed orchestrator
re-runs the same rounds: finished ones replay from their journals, and survivors are a pure
function of the curves, so they come out the same (no duplicate launch, no retraining past a
checkpoint).  The cost is one job start per candidate per round.

The rules themselves (rungs, who survives, when the ranking settled) are pure functions of curves
in :mod:`lag_ds.select.policies`; this module only runs the rounds.

Example::

    >>> result = run_race(names, base_step=300, policy=RacePolicy(name="sh", k=40, eta=3,
    ...                   min_steps=5), make_job=make_job, journal_dir=out,
    ...                   run_kw=dict(allocation=alloc, slots_per_slice=1))   # doctest: +SKIP
    >>> result.survivors                                                       # doctest: +SKIP
    [['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i'], ['a', 'c', 'h'], ['c']]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lag_ds.launch import JobSpec, run_jobs
from lag_ds.select import Curve, load_curve
from lag_ds.select.policies import settle_step, sh_keep, sh_rungs

POLICIES = ("lag", "sh", "settle")


@dataclass(frozen=True, kw_only=True)
class RacePolicy:
    """How long candidates train before the decision, and which ones go on."""

    name: str = "lag"
    """``lag`` | ``sh`` | ``settle`` (module docstring)."""
    k: int
    """LAG@k's k; for ``sh`` the last rung; for ``settle`` the default cap."""
    eta: int = 3
    """SH: keep the best ceil(n/eta) at each rung."""
    min_steps: int | None = None
    """SH: the first rung r0 (default: k // eta**2, at least 1)."""
    tau: float = 0.9
    """settle: Spearman threshold between consecutive evaluations."""
    m: int = 3
    """settle: how many consecutive pairs of evaluations must reach tau."""
    floor: int | None = None
    """settle: earliest step (since growing) it may decide at (default: chunk)."""
    cap: int | None = None
    """settle: latest step it decides at (default: k)."""
    chunk: int | None = None
    """settle: steps per round (default: k // 4, at least 1)."""

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.name!r}")
        if self.k < 1:
            raise ValueError(f"policy k must be >= 1, got {self.k}")
        if self.name == "sh":
            sh_rungs(self.k, min_steps=self.r0, eta=self.eta)  # validates eta and r0
        if self.name == "settle":
            if not 0.0 < self.tau <= 1.0:
                raise ValueError(f"settle tau must be in (0, 1], got {self.tau}")
            if self.m < 1:
                raise ValueError(f"settle m must be >= 1, got {self.m}")
            if not 1 <= self.settle_floor <= self.settle_cap:
                raise ValueError(f"settle needs 1 <= floor ({self.settle_floor}) <= cap "
                                 f"({self.settle_cap})")

    @property
    def r0(self) -> int:
        return self.min_steps if self.min_steps is not None else max(1, self.k // self.eta ** 2)

    @property
    def settle_chunk(self) -> int:
        return self.chunk if self.chunk is not None else max(1, self.k // 4)

    @property
    def settle_cap(self) -> int:
        return self.cap if self.cap is not None else self.k

    @property
    def settle_floor(self) -> int:
        return self.floor if self.floor is not None else min(self.settle_chunk, self.settle_cap)

    def describe(self) -> str:
        if self.name == "lag":
            return f"LAG@{self.k}"
        if self.name == "sh":
            return f"SH(eta={self.eta},r0={self.r0},k={self.k})"
        return (f"settle(tau={self.tau:g},m={self.m},floor={self.settle_floor},"
                f"cap={self.settle_cap},chunk={self.settle_chunk})")


@dataclass(frozen=True, kw_only=True)
class RaceResult:
    """What the race leaves for the decision."""

    curves: dict[str, Curve]
    """Every candidate's validation curve that exists (stopped ones included)."""
    failed: dict[str, str]
    """Candidates that crashed, hung or diverged, with the launcher's reason."""
    stopped: dict[str, int]
    """Candidates a policy stopped, with the step since growing where they stopped."""
    decision_k: int
    """Steps since growing at which the winner is chosen (LAG@k's k)."""
    trained_to: dict[str, int]
    """Steps since growing each candidate's last checkpoint is at."""
    record: dict[str, Any] = field(default_factory=dict)
    """The policy's trace for selection.json (rungs and survivors, settle evaluations)."""

    @property
    def candidate_steps(self) -> int:
        return sum(self.trained_to.values())


MakeJob = Callable[[str, int], JobSpec]
"""(candidate name, absolute target step) -> the job that trains it there."""


def _round(names: Sequence[str], target: int, *, make_job: MakeJob, journal: Path,
           run_kw: Mapping[str, Any], failed: dict[str, str], paths: dict[str, Path]) -> None:
    jobs = [make_job(name, target) for name in names]
    paths.update({job.name: job.metrics_path for job in jobs})
    results = run_jobs(jobs, journal_path=journal, **run_kw)
    for name, r in results.items():
        if r.state != "finished":
            failed[name] = r.reason


def _curves(paths: Mapping[str, Path]) -> dict[str, Curve]:
    return {name: load_curve(path, name=name) for name, path in paths.items() if path.exists()}


def _loss_at(curve: Curve | None, step: int) -> float:
    if curve is None or not curve.has_step(step):
        return math.nan
    return float(curve.value_at(step))


def run_race(names: Sequence[str], *, base_step: int, policy: RacePolicy, make_job: MakeJob,
             journal_dir: Path, run_kw: Mapping[str, Any],
             say: Callable[[str], None] | None = None) -> RaceResult:
    """Run the race of ``policy`` over the candidates ``names`` (see the module docstring).

    ``run_kw`` goes to :func:`run_jobs` (allocation, slots_per_slice, timeouts, launcher, ...).
    Journals are ``journal_dir/journal-candidates.jsonl`` for ``lag`` and one per round for the
    others (``journal-race-sh-r{i}.jsonl`` / ``journal-race-settle-t{t}.jsonl``).
    """
    names = list(names)
    say = say or (lambda message: None)
    failed: dict[str, str] = {}
    paths: dict[str, Path] = {}  # metrics file of every candidate launched in some round
    if policy.name == "lag":
        _round(names, base_step + policy.k, make_job=make_job, run_kw=run_kw, failed=failed,
               paths=paths,
               journal=journal_dir / "journal-candidates.jsonl")
        curves = _curves(paths)
        trained = {n: policy.k for n in names if n not in failed}
        return RaceResult(curves=curves, failed=failed, stopped={}, decision_k=policy.k,
                          trained_to=trained, record={"policy": policy.describe()})

    if policy.name == "sh":
        rungs = sh_rungs(policy.k, min_steps=policy.r0, eta=policy.eta)
        alive, survivors_log, stopped = list(names), [], {}
        trained: dict[str, int] = {}
        decision = policy.k
        for i, rung in enumerate(rungs):
            survivors_log.append(list(alive))
            say(f"SH rung {i + 1}/{len(rungs)}: {len(alive)} candidate(s) to step +{rung}")
            _round(alive, base_step + rung, make_job=make_job, run_kw=run_kw, failed=failed,
               paths=paths,
                   journal=journal_dir / f"journal-race-sh-r{i}.jsonl")
            curves = _curves(paths)
            for n in alive:
                trained[n] = rung
            alive = [n for n in alive if n not in failed]
            if i < len(rungs) - 1 and alive:
                losses = {n: _loss_at(curves.get(n), base_step + rung) for n in alive}
                keep = set(sh_keep(losses, eta=policy.eta))
                for n in alive:
                    if n not in keep:
                        stopped[n] = rung
                alive = [n for n in alive if n in keep]
                say(f"SH rung {i + 1}/{len(rungs)} at +{rung}: kept {', '.join(alive)}; "
                    f"stopped {', '.join(n for n in losses if n not in keep) or 'none'}")
                if len(alive) == 1:  # one survivor left: it is the winner, decided here
                    decision = rung
                    break
        for n in failed:
            trained.pop(n, None)
        record = {"policy": policy.describe(), "rungs": list(rungs), "survivors": survivors_log,
                  "final": alive}
        return RaceResult(curves=_curves(paths), failed=failed, stopped=stopped,
                          decision_k=decision, trained_to=trained, record=record)

    # settle
    t, evaluations = 0, []
    while True:
        t = min(max(t + policy.settle_chunk, policy.settle_floor), policy.settle_cap)
        alive = [n for n in names if n not in failed]
        say(f"settle round: {len(alive)} candidate(s) to step +{t}")
        _round(alive, base_step + t, make_job=make_job, run_kw=run_kw, failed=failed,
               paths=paths,
               journal=journal_dir / f"journal-race-settle-t{t}.jsonl")
        curves = {n: c for n, c in _curves(paths).items() if n not in failed}
        steps = sorted({int(s) - base_step for c in curves.values() for s in c.steps
                        if base_step <= s <= base_step + t})
        by_step = {s: {n: _loss_at(c, base_step + s) for n, c in curves.items()
                       if c.has_step(base_step + s)} for s in steps}
        decided = settle_step(by_step, tau=policy.tau, m=policy.m, floor=policy.settle_floor,
                              cap=policy.settle_cap)
        evaluations.append({"trained_to": t, "decided_at": decided})
        say(f"settle: ranking {'settled at +%d' % decided if decided is not None else 'not settled'}"
            f" after {len(by_step)} evaluations")
        if decided is not None or t >= policy.settle_cap or not curves:
            break
    k = decided if decided is not None else t
    trained = {n: t for n in names if n not in failed}
    record = {"policy": policy.describe(), "rounds": evaluations, "settled_at": decided}
    return RaceResult(curves=_curves(paths), failed=failed, stopped={}, decision_k=k,
                      trained_to=trained, record=record)
