"""``selection.json``: the durable record of a LAG@k decision, written atomically.

The winner named here is a pointer that promotion follows (RELIABILITY item 3), so:

* it is written only after the decision is complete, via temp file + fsync + rename + directory
  fsync: a reader sees the old file or the new one, never half of one, and a crash leaves no
  ``.tmp`` behind that could be mistaken for a decision;
* reading is strict: a missing key, a wrong type, an unknown version or a winner that is not in
  the ranking is a ``ValueError`` naming the file, never a default.

The data seed is stored because LAG compares candidates on the same validation batches; a decision
made with another seed is a different decision.  JSON is written with ``allow_nan=False``: the
selector never ranks non-finite losses, and curve summaries turn them into ``null``.

Example::

    >>> write_selection_json("runs/lag/selection.json", sel, data_seed=1234)   # doctest: +SKIP
    >>> read_selection_json("runs/lag/selection.json").selection.winner         # doctest: +SKIP
    'dup_last_4'
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lag_ds.atomic_io import atomic_write_text
from lag_ds.select.curves import CurveSummary
from lag_ds.select.lag import RankedCandidate, Selection

SELECTION_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class SelectionFile:
    """What :func:`read_selection_json` returns."""

    selection: Selection
    data_seed: int
    extra: Mapping[str, Any] = field(default_factory=dict)


def _selection_to_json(selection: Selection, *, data_seed: int,
                       extra: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "version": SELECTION_VERSION,
        "winner": selection.winner,
        "k": selection.k,
        "base_step": selection.base_step,
        "decision_step": selection.decision_step,
        "smoothing_window": selection.smoothing_window,
        "data_seed": data_seed,
        "ranking": [asdict(r) for r in selection.ranking],
        "excluded": dict(selection.excluded),
        "lag0_winner": selection.lag0_winner,
        "curves": {name: asdict(s) for name, s in selection.summaries.items()},
        "extra": dict(extra or {}),
    }


def write_selection_json(path: str | Path, selection: Selection, *, data_seed: int,
                         extra: Mapping[str, Any] | None = None) -> Path:
    """Atomically write ``selection.json`` at ``path``; returns the path."""
    path = Path(path)
    if isinstance(data_seed, bool) or not isinstance(data_seed, int):
        raise ValueError(f"write_selection_json: data_seed must be an int, got {data_seed!r}")
    text = json.dumps(_selection_to_json(selection, data_seed=data_seed, extra=extra),
                      indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    return path


def _get(obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], *, where: str) -> Any:
    if key not in obj:
        raise ValueError(f"{where}: missing key {key!r}")
    value = obj[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ValueError(f"{where}: {key!r} has type bool")
    if not isinstance(value, types):
        raise ValueError(f"{where}: {key!r} has type {type(value).__name__}")
    return value


def _number_or_none(value: Any, *, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number or null, got {value!r}")
    return float(value)


def read_selection_json(path: str | Path) -> SelectionFile:
    """Read and validate a ``selection.json``; any inconsistency is a ``ValueError``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    where = str(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object")
    version = _get(raw, "version", int, where=where)
    if version != SELECTION_VERSION:
        raise ValueError(f"{where}: unsupported version {version} (expected {SELECTION_VERSION})")
    ranking = []
    for i, row in enumerate(_get(raw, "ranking", list, where=where)):
        w = f"{where}: ranking[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{w}: expected an object")
        ranking.append(RankedCandidate(
            name=_get(row, "name", str, where=w),
            rank=_get(row, "rank", int, where=w),
            lag_k_loss=float(_get(row, "lag_k_loss", (int, float), where=w)),
            lag_0_loss=_number_or_none(_get(row, "lag_0_loss", (int, float, type(None)), where=w),
                                       where=w),
        ))
    if [r.rank for r in ranking] != list(range(1, len(ranking) + 1)):
        raise ValueError(f"{where}: ranks must be 1..{len(ranking)} in order")
    winner = _get(raw, "winner", str, where=where)
    if not ranking or ranking[0].name != winner:
        raise ValueError(f"{where}: winner {winner!r} is not rank 1 of the ranking")
    excluded = _get(raw, "excluded", dict, where=where)
    if not all(isinstance(v, str) for v in excluded.values()):
        raise ValueError(f"{where}: 'excluded' values must be strings")
    summaries = {}
    for name, s in _get(raw, "curves", dict, where=where).items():
        w = f"{where}: curves[{name!r}]"
        if not isinstance(s, dict) or set(s) != set(CurveSummary.__dataclass_fields__):
            raise ValueError(f"{w}: expected keys {sorted(CurveSummary.__dataclass_fields__)}")
        summaries[name] = CurveSummary(**s)
    lag0_winner = _get(raw, "lag0_winner", (str, type(None)), where=where)
    selection = Selection(
        winner=winner,
        k=_get(raw, "k", int, where=where),
        base_step=_get(raw, "base_step", int, where=where),
        smoothing_window=_get(raw, "smoothing_window", int, where=where),
        ranking=tuple(ranking),
        excluded=dict(excluded),
        lag0_winner=lag0_winner,
        summaries=summaries,
    )
    if _get(raw, "decision_step", int, where=where) != selection.decision_step:
        raise ValueError(f"{where}: decision_step != base_step + k")
    return SelectionFile(selection=selection, data_seed=_get(raw, "data_seed", int, where=where),
                         extra=_get(raw, "extra", dict, where=where))
