"""Validation curves read from a run's ``metrics.jsonl``.

The selector only ever sees curves: a name, the global steps at which one tag was logged, and the
values.  Everything LAG needs (loss at step ``base_step + k``, the loss right after growing, curve
summaries for ``selection.json``) is computed from this one small type, so the selector never
knows about checkpoints, models or launchers.

Why the reader is strict except for the last line: a candidate killed mid-write (SIGKILL by the
supervisor, OOM, node loss) can leave a half-written final line, and that is an expected event,
so it is dropped.  Anything else that does not parse is a corrupted or foreign file, and picking
a winner from it silently would be worse than stopping, so it is a ``ValueError`` naming
``file:line``.

A restarted job (the trainer resumed from its last checkpoint) logs the steps after that
checkpoint again; the later record of a step wins because it describes the run that went on.

Example::

    >>> curve = load_curve("runs/cand_03/metrics.jsonl")            # doctest: +SKIP
    >>> curve.value_at(300_200)                                      # doctest: +SKIP
    2.417
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lag_ds.metrics_schema import VAL_LOSS, parse_record

DEFAULT_TAG = VAL_LOSS


@dataclass(frozen=True, kw_only=True, eq=False)
class Curve:
    """One tag of one run: ``values[i]`` was logged at global step ``steps[i]``.

    ``steps`` is strictly increasing (int64); ``values`` is float64 and may hold NaN/inf, which
    the selector turns into an exclusion reason rather than a number to rank.
    """

    name: str
    """Candidate name (by default the run directory's name)."""
    steps: np.ndarray
    """Global steps, strictly increasing."""
    values: np.ndarray
    """Logged values, same length as ``steps``."""

    def __post_init__(self) -> None:
        steps = np.asarray(self.steps, dtype=np.int64)
        values = np.asarray(self.values, dtype=np.float64)
        if steps.ndim != 1 or values.shape != steps.shape:
            raise ValueError(f"Curve {self.name!r}: steps and values must be 1-D of equal length")
        if steps.size > 1 and not np.all(np.diff(steps) > 0):
            raise ValueError(f"Curve {self.name!r}: steps must be strictly increasing")
        steps.setflags(write=False)
        values.setflags(write=False)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "values", values)

    def __len__(self) -> int:
        return int(self.steps.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Curve):
            return NotImplemented
        return (
            self.name == other.name
            and np.array_equal(self.steps, other.steps)
            and np.array_equal(self.values, other.values, equal_nan=True)
        )

    def has_step(self, step: int) -> bool:
        """Whether a value was logged exactly at ``step``."""
        i = int(np.searchsorted(self.steps, step))
        return i < self.steps.size and int(self.steps[i]) == step

    def value_at(self, step: int) -> float:
        """The value logged exactly at ``step``; ``KeyError`` if there is none."""
        i = int(np.searchsorted(self.steps, step))
        if i >= self.steps.size or int(self.steps[i]) != step:
            raise KeyError(f"curve {self.name!r} has no point at step {step}")
        return float(self.values[i])

    def window(self, *, start: int, stop: int) -> "Curve":
        """The points with ``start <= step <= stop`` (both inclusive)."""
        lo = int(np.searchsorted(self.steps, start, side="left"))
        hi = int(np.searchsorted(self.steps, stop, side="right"))
        return Curve(name=self.name, steps=self.steps[lo:hi], values=self.values[lo:hi])

    def first_non_finite_step(self) -> int | None:
        """The first step whose value is NaN or +-inf, or ``None`` if all are finite."""
        bad = np.flatnonzero(~np.isfinite(self.values))
        return int(self.steps[bad[0]]) if bad.size else None


def _parse_line(text: str, *, where: str) -> dict:
    return parse_record(text, where=where)


def read_records(path: str | Path) -> list[dict]:
    """All complete records of a metrics.jsonl, in file order.

    A final line that does not parse (the writer was killed mid-line) is dropped; any other bad
    line raises ``ValueError("<path>:<line>: ...")``.
    """
    path = Path(path)
    data = path.read_text(encoding="utf-8")
    lines = data.split("\n")
    # ``data`` ends with "\n" for a clean file, giving one trailing empty string.
    complete_tail = lines[-1] == ""
    if complete_tail:
        lines = lines[:-1]
    records: list[dict] = []
    for number, text in enumerate(lines, start=1):
        is_last = number == len(lines)
        try:
            if not text.strip():
                raise ValueError(f"{path}:{number}: empty line")
            records.append(_parse_line(text, where=f"{path}:{number}"))
        except ValueError:
            if is_last and not complete_tail:
                break  # torn final write: the job died mid-line
            raise
    return records


def load_curve(path: str | Path, tag: str = DEFAULT_TAG, *, name: str | None = None) -> Curve:
    """Read one tag of a ``metrics.jsonl`` into a :class:`Curve`.

    ``name`` defaults to the run directory's name (the file's parent).  Records without ``tag``
    (train records, other evals) are skipped; a record whose ``tag`` is not a number is an error.
    """
    path = Path(path)
    by_step: dict[int, float] = {}
    for number, record in enumerate(read_records(path), start=1):
        if tag not in record:
            continue
        value = record[tag]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: record {number}: {tag!r} must be a number, got {value!r}")
        by_step[record["step"]] = float(value)  # a re-logged step (resumed run) replaces the old
    steps = sorted(by_step)
    return Curve(
        name=name if name is not None else path.parent.name,
        steps=np.array(steps, dtype=np.int64),
        values=np.array([by_step[s] for s in steps], dtype=np.float64),
    )


@dataclass(frozen=True, kw_only=True)
class CurveSummary:
    """What ``selection.json`` records about each candidate's curve (JSON-safe: no NaN)."""

    num_points: int
    first_step: int | None
    last_step: int | None
    min_loss: float | None
    """Smallest finite value, ``None`` if there is none."""
    final_loss: float | None
    """Value at ``last_step``; ``None`` if it is not finite or the curve is empty."""
    num_non_finite: int

    @classmethod
    def of(cls, curve: Curve) -> "CurveSummary":
        finite = curve.values[np.isfinite(curve.values)]
        last = float(curve.values[-1]) if len(curve) else math.nan
        return cls(
            num_points=len(curve),
            first_step=int(curve.steps[0]) if len(curve) else None,
            last_step=int(curve.steps[-1]) if len(curve) else None,
            min_loss=float(finite.min()) if finite.size else None,
            final_loss=last if math.isfinite(last) else None,
            num_non_finite=int(curve.values.size - finite.size),
        )
