"""``analyze_run``: "Does LAG choose well?" for one LAG run directory, as numbers.

Reads only ``RUN_DIR/selection.json`` and the candidates' ``candidates/<name>/run/metrics.jsonl``
and returns one JSON-safe dict (``report.json``) with every number the report shows; rendering
(markdown, figures, TensorBoard) is in :mod:`lag_ds.select.report_files`.

Two kinds of runs:

* **study** -- candidates trained past ``base_step + k``.  The *final step* is the last step any
  analysed candidate reached; the *final losses* are the raw ``val/loss`` of the candidates with a
  point there (others -- e.g. stopped early by SH -- are listed under ``final.left_out``).  Regret,
  recall and the correlation with the final loss are computed; k is proposed from the
  correlation with the final loss.
* **race-only** -- curves end at ``base_step + k``: no finals, no regret or recall; k is proposed
  from the self-correlation matrix alone.

Candidates the launcher marked failed (``selection.json`` excluded ``failed: ...``), candidates
without a metrics file and curves with NaN/inf are left out of the landscape with their reason.
Replayed policies (:mod:`lag_ds.select.policies`) see the raw curves of every non-failed candidate,
as a live race would have.

Example::

    >>> rep = analyze_run("runs/ul2_lag", smoothing=11)                  # doctest: +SKIP
    >>> rep["kind"], rep["k_proposal"]["k"], rep["table"][1]["relative_regret"]  # doctest: +SKIP
    ('study', 2000, 0.0895)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lag_ds.select.curves import Curve, load_curve
from lag_ds.select.landscape import loss_table, self_correlation, step_stats
from lag_ds.select.phase import (
    DEFAULT_MARGIN,
    DEFAULT_THRESHOLD,
    propose_k_from_final,
    propose_k_from_self,
)
from lag_ds.select.policies import (
    PolicyOutcome,
    lag_at_every_step,
    replay_lag,
    replay_settle,
    replay_sh,
    settle_step,
    sh_rungs,
)
from lag_ds.select.selection_file import SelectionFile, read_selection_json
from lag_ds.select.strategies import on_top_operators, strategy_table

__all__ = ["REPORT_VERSION", "ReplaySpec", "analyze_run", "candidate_dirs", "check_replay",
           "default_replays", "final_losses", "load_run", "parse_replay"]

REPORT_VERSION = 1
MAX_HEATMAP_STEPS = 400
_REPLAY_KEYS = {"lag": {"k": int, "w": int}, "sh": {"eta": int, "r0": int, "k": int},
                "settle": {"tau": float, "m": int, "floor": int, "cap": int}}


@dataclass(frozen=True, kw_only=True)
class ReplaySpec:
    """One ``--replay`` value, e.g. ``sh:eta=3,r0=10,k=40``; missing keys take run defaults."""

    kind: str
    params: Mapping[str, float]


def parse_replay(text: str) -> ReplaySpec:
    """Parse ``KIND:key=value,...`` (KIND ``lag``, ``sh`` or ``settle``)."""
    kind, _, rest = text.partition(":")
    if kind not in _REPLAY_KEYS:
        raise ValueError(f"--replay {text!r}: kind must be one of {sorted(_REPLAY_KEYS)}")
    params: dict[str, float] = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq or key not in _REPLAY_KEYS[kind]:
            raise ValueError(f"--replay {text!r}: expected key=value with keys "
                             f"{sorted(_REPLAY_KEYS[kind])}, got {part!r}")
        try:
            params[key] = _REPLAY_KEYS[kind][key](value)
        except ValueError:
            raise ValueError(f"--replay {text!r}: {key}={value!r} is not a valid "
                             f"{_REPLAY_KEYS[kind][key].__name__}") from None
    return ReplaySpec(kind=kind, params=params)


def default_replays(k: int, *, eval_every: int = 1) -> tuple[ReplaySpec, ...]:
    """SH (eta=3, r0 = about k/9 rounded to a multiple of ``eval_every`` so that every rung has
    a validation point: rungs ~k/9, ~k/3, k) and settle (tau=0.9, m=3, floor=0, cap=k); none when
    ``k == 0``."""
    if k < 1:
        return ()
    r0 = min(k, eval_every * max(1, (k // 9) // eval_every))
    return (ReplaySpec(kind="sh", params={"eta": 3, "r0": r0, "k": k}),
            ReplaySpec(kind="settle", params={"tau": 0.9, "m": 3, "floor": 0, "cap": k}))


def check_replay(spec: ReplaySpec, *, k: int) -> None:
    """Validate a spec's parameters against the run's k (``ValueError`` naming the spec)."""
    p = dict(spec.params)
    try:
        if spec.kind == "lag" and (p.get("k", k) < 0 or p.get("w", 1) < 1):
            raise ValueError("need k >= 0 and w >= 1")
        if spec.kind == "sh":
            kk = int(p.get("k", k))
            sh_rungs(kk, min_steps=int(p.get("r0", max(1, kk // 9))), eta=int(p.get("eta", 3)))
        if spec.kind == "settle":
            settle_step({}, tau=p.get("tau", 0.9), m=int(p.get("m", 3)),
                        floor=int(p.get("floor", 0)), cap=int(p.get("cap", k)))
    except ValueError as err:
        raise ValueError(f"--replay {spec.kind}:{_spec_text(p)}: {err}") from None


def _spec_text(params: Mapping[str, float]) -> str:
    return ",".join(f"{key}={value:g}" for key, value in params.items())


def _run_replay(spec: ReplaySpec, curves: Mapping[str, Curve], *, base_step: int, k: int,
                finals: Mapping[str, float] | None) -> PolicyOutcome:
    p = dict(spec.params)
    if spec.kind == "lag":
        return replay_lag(curves, base_step=base_step, k=int(p.get("k", k)),
                          smoothing_window=int(p.get("w", 1)), final_losses=finals)
    if spec.kind == "sh":
        eta = int(p.get("eta", 3))
        kk = int(p.get("k", k))
        return replay_sh(curves, base_step=base_step, k=kk,
                         min_steps=int(p.get("r0", max(1, kk // 9))), eta=eta, final_losses=finals)
    return replay_settle(curves, base_step=base_step, tau=float(p.get("tau", 0.9)),
                         m=int(p.get("m", 3)), floor=int(p.get("floor", 0)),
                         cap=int(p.get("cap", k)), final_losses=finals)


def candidate_dirs(run_dir: Path, sel: SelectionFile) -> dict[str, Path]:
    """Candidate name -> ``run_dir/candidates/<name>`` for every candidate ``selection.json``
    knows (ranked, excluded, or listed in ``extra.operators``)."""
    names = {r.name for r in sel.selection.ranking} | set(sel.selection.excluded)
    ops = sel.extra.get("operators", {})
    if isinstance(ops, Mapping):
        names |= set(ops)
    return {n: run_dir / "candidates" / n for n in sorted(names)}


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _load_curves(run_dir: Path, sel: SelectionFile) -> tuple[dict[str, Curve], dict[str, str]]:
    curves: dict[str, Curve] = {}
    left_out: dict[str, str] = {}
    for name, cdir in candidate_dirs(run_dir, sel).items():
        reason = sel.selection.excluded.get(name, "")
        path = cdir / "run" / "metrics.jsonl"
        if reason.startswith("failed"):
            left_out[name] = f"selection.json: {reason}"
        elif not path.is_file():
            left_out[name] = f"no metrics file {path}"
        else:
            curves[name] = load_curve(path, name=name)  # a corrupt line is a ValueError
    return curves, left_out


def load_run(run_dir: str | Path) -> tuple[SelectionFile, dict[str, Curve], dict[str, str]]:
    """``(selection.json, {candidate: val/loss curve}, {candidate: why it has no curve})`` of a
    run directory; ``ValueError`` naming the file for a missing/corrupt input or no usable curve.
    Candidates the launcher marked failed are left out."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: RUN_DIR is not a directory")
    sel_path = run_dir / "selection.json"
    if not sel_path.is_file():
        raise ValueError(f"{sel_path}: no selection.json (not a LAG run directory?)")
    sf = read_selection_json(sel_path)
    curves, left_out = _load_curves(run_dir, sf)
    if not curves:
        raise ValueError(f"{run_dir}: no candidate has a metrics file under candidates/*/run/")
    if not loss_table(curves, base_step=sf.selection.base_step).names:
        raise ValueError(f"{run_dir}: no candidate curve is usable ({left_out})")
    return sf, curves, left_out


def final_losses(curves: Mapping[str, Curve], *,
                 base_step: int) -> tuple[int, dict[str, float], dict[str, str]]:
    """``(final t, {candidate: raw loss there}, {candidate: why it has none})``: the final step
    is the last step any usable curve (no NaN/inf from ``base_step`` on) reached."""
    raw = loss_table(curves, base_step=base_step)
    if not raw.names:
        raise ValueError("final_losses: no usable curve")
    last_t = int(raw.steps[-1])
    finals = raw.at(raw.steps.size - 1)
    left = {n: f"no point at the final step (last at t={int(curves[n].steps[-1]) - base_step})"
            for n in raw.names if n not in finals}
    return last_t, finals, left


def _heatmap_rows(steps: np.ndarray, horizon: int) -> np.ndarray:
    rows = np.flatnonzero(steps <= horizon)
    if rows.size > MAX_HEATMAP_STEPS:  # evenly spaced subset keeps the matrix small
        rows = rows[np.unique(np.linspace(0, rows.size - 1, MAX_HEATMAP_STEPS).round().astype(int))]
    return rows


def analyze_run(run_dir: str | Path, *, smoothing: int = 1, threshold: float = DEFAULT_THRESHOLD,
                margin: float = DEFAULT_MARGIN, horizon: int | None = None,
                replays: Sequence[ReplaySpec] = ()) -> dict[str, Any]:
    """Everything the report shows, as a JSON-safe dict (see the module docstring)."""
    sf, curves, left_out = load_run(run_dir)
    run_dir = Path(run_dir)
    sel = sf.selection
    base, k = sel.base_step, sel.k
    for spec in replays:
        check_replay(spec, k=k)
    if horizon is not None and horizon < 0:
        raise ValueError(f"--horizon must be >= 0, got {horizon}")
    if isinstance(smoothing, bool) or not isinstance(smoothing, int) or smoothing < 1 \
            or smoothing % 2 == 0:
        raise ValueError(f"--smoothing must be an odd integer >= 1 (centred window), "
                         f"got {smoothing!r}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must be in [-1, 1], got {threshold}")
    if not margin >= 1.0:
        raise ValueError(f"--margin must be >= 1, got {margin}")
    table = loss_table(curves, base_step=base, smoothing_window=smoothing)
    left_out.update(table.excluded)
    raw = loss_table(curves, base_step=base)
    last_t = int(raw.steps[-1])
    study = last_t > k
    finals: dict[str, float] | None = None
    final_info = None
    if study:
        _, finals, final_left = final_losses(curves, base_step=base)
        final_info = {"step": base + last_t, "t": last_t, "losses": finals,
                      "left_out": final_left}

    stats = step_stats(table, final_losses=finals)
    hz = horizon if horizon is not None else (k if k > 0 else last_t)
    rows = _heatmap_rows(table.steps, hz)
    matrix = self_correlation(table, rows=rows)
    hsteps = [int(s) for s in table.steps[rows]]
    by_self = propose_k_from_self(hsteps, matrix, threshold=threshold, margin=margin)
    proposals = [by_self]
    if study:
        by_final = propose_k_from_final([s.t for s in stats], [s.spearman_final for s in stats],
                                        threshold=threshold, margin=margin)
        proposals.insert(0, by_final)

    raced = {n: c for n, c in curves.items()
             if not sel.excluded.get(n, "").startswith("failed")}
    lag_at_t = []
    for t, out in lag_at_every_step(raced, base_step=base, smoothing_window=sel.smoothing_window,
                                    final_losses=finals).items():
        lag_at_t.append({"t": t, "pick": out.pick if out else None,
                         "regret": out.regret if out else None,
                         "relative_regret": out.relative_regret if out else None})

    replay_rows, outcomes = [], []
    every = math.gcd(*(int(t) for t in raw.steps if 0 < t <= k)) or 1
    for spec in (*default_replays(k, eval_every=every), *replays):
        try:
            out = _run_replay(spec, raced, base_step=base, k=k, finals=finals)
            outcomes.append(out)
            replay_rows.append({"spec": asdict(spec), **asdict(out)})
        except ValueError as err:  # e.g. the curves end before settling; recorded, not fatal
            replay_rows.append({"spec": asdict(spec), "error": str(err)})

    table_rows = None
    if study and finals:
        nl = sf.extra.get("num_layers", {})
        ops = sf.extra.get("operators", {})
        on_top = (on_top_operators(ops, base_num_layers=int(nl["base"]))
                  if isinstance(nl, Mapping) and "base" in nl and isinstance(ops, Mapping)
                  else {})
        table_rows = [asdict(r) for r in strategy_table(
            finals, final_t=last_t, num_candidates=len(sel.ranking) + len(sel.excluded),
            lag_k=k, lag_pick=sel.winner, lag0_pick=sel.lag0_winner, on_top=on_top,
            replays=outcomes)]

    chosen = proposals[0]
    return {
        "version": REPORT_VERSION,
        "run_dir": str(run_dir),
        "kind": "study" if study else "race-only",
        "base_step": base, "k": k, "winner": sel.winner, "lag0_winner": sel.lag0_winner,
        "selection_smoothing_window": sel.smoothing_window,
        "analysis_smoothing_window": smoothing,
        "threshold": threshold, "margin": margin,
        "num_raced": len(sel.ranking) + len(sel.excluded),
        "candidates": list(table.names),
        "left_out": dict(sorted(left_out.items())),
        "last_t": last_t,
        "final": final_info,
        "steps": [{**asdict(s), "recall": ({str(kk): v for kk, v in s.recall.items()}
                                            if s.recall is not None else None)} for s in stats],
        "lag_at_t": lag_at_t,
        "self_correlation": {"horizon": hz, "steps": hsteps,
                             "matrix": [[_json_float(v) for v in row] for row in matrix]},
        "k_proposals": [{**asdict(p), "description": p.describe()} for p in proposals],
        "k_proposal": {**asdict(chosen), "description": chosen.describe()},
        "replays": replay_rows,
        "table": table_rows,
        "curves": {n: {"t": (curves[n].steps - base).tolist(),
                       "loss": [_json_float(v) for v in curves[n].values]}
                   for n in sorted(curves)},
        "verdict": _verdict(study=study, k=k, winner=sel.winner, stats=stats, chosen=chosen,
                            table_rows=table_rows, final_info=final_info),
    }


def _at(stats, t: int):
    return next((s for s in stats if s.t == t), None)


def _verdict(*, study: bool, k: int, winner: str, stats, chosen, table_rows,
             final_info) -> str:
    parts = []
    if study and table_rows:
        lag = table_rows[1]
        oracle = table_rows[0]
        lag0 = table_rows[2]
        if lag["regret"] is None:
            parts.append(f"LAG@{k} picked {winner}, which has no final loss, so its regret is "
                         "unknown.")
        elif lag["regret"] == 0:
            parts.append(f"LAG@{k} picked {winner}, the final-best candidate (regret 0) at "
                         f"step {final_info['step']}.")
        else:
            parts.append(f"LAG@{k} picked {winner}; the final-best is {oracle['pick']}. Regret "
                         f"{lag['regret']:.4g}, relative regret {lag['relative_regret']:.3f} "
                         f"(0 = oracle, 1 = worst).")
        if lag0["relative_regret"] is not None:
            parts.append(f"Loss preservation (LAG@0) would have picked {lag0['pick']} "
                         f"(relative regret {lag0['relative_regret']:.3f}).")
        s0, sk = _at(stats, 0), _at(stats, k)
        if s0 and sk and s0.spearman_final is not None and sk.spearman_final is not None:
            parts.append(f"Spearman correlation with the final loss: {s0.spearman_final:.2f} at "
                         f"t=0, {sk.spearman_final:.2f} at t={k}.")
    else:
        parts.append(f"Race-only run: no final losses, so regret and recall cannot be computed; "
                     f"LAG@{k} picked {winner}.")
    parts.append(f"Proposed k, {chosen.describe()}.")
    if chosen.k is None:
        parts.append(f"The ranking did not settle in the data: the race's k={k} may be too "
                     "short to trust.")
    elif chosen.k <= k:
        parts.append(f"The race's k={k} is at or past the proposed k={chosen.k}: LAG decided "
                     "after the ranking settled, with margin.")
    elif chosen.transition is not None and chosen.transition <= k:
        parts.append(f"The race's k={k} is past the transition (t={chosen.transition}) but "
                     f"short of the margin (proposed k={chosen.k}).")
    else:
        parts.append(f"The race's k={k} is before the transition (t={chosen.transition}): LAG "
                     "decided while the ranking was still moving.")
    return " ".join(parts)
