"""Progress display for a wave of candidate jobs.

On a terminal the supervisor redraws one compact table in place (ANSI cursor-up + clear), so
thirty candidates fit on a screen; in a log file (SLURM output, CI) redrawing would write the
table thousands of times, so there it prints one plain line per state change instead.

Example::

    >>> rep = ProgressReporter(sys.stderr)
    >>> rep.update([ProgressRow(name="c0", state="running", attempt=1, steps_done=40,
    ...                         last_val_loss=2.5)])                 # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

DISPLAY_STATES = ("waiting", "running", "stopping", "finished", "failed")


@dataclass(frozen=True, kw_only=True)
class ProgressRow:
    """What the display shows for one candidate."""

    name: str
    state: str
    """One of ``DISPLAY_STATES`` (``stopping``: being killed)."""
    attempt: int
    steps_done: int | None = None
    """Steps since the job's first logged step."""
    last_step: int | None = None
    last_val_loss: float | None = None
    reason: str = ""


def _fmt_loss(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def format_table(rows: Sequence[ProgressRow]) -> list[str]:
    """The table as lines (a header with counts, then one line per candidate)."""
    counts = {s: sum(r.state == s for r in rows) for s in DISPLAY_STATES}
    header = "candidates: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    width = max([len("candidate")] + [len(r.name) for r in rows])
    lines = [header, f"{'candidate':<{width}}  {'state':<8}  try  {'steps':>7}  "
                     f"{'step':>9}  {'val loss':>8}  reason"]
    for r in rows:
        steps = "-" if r.steps_done is None else str(r.steps_done)
        step = "-" if r.last_step is None else str(r.last_step)
        lines.append(f"{r.name:<{width}}  {r.state:<8}  {r.attempt:>3}  {steps:>7}  {step:>9}  "
                     f"{_fmt_loss(r.last_val_loss):>8}  {r.reason}")
    return lines


class ProgressReporter:
    """Redraws a table on a TTY; otherwise prints state changes, plus a heartbeat line per running
    job every ``heartbeat_s`` (steps done, last validation loss) so a tailed log shows progress."""

    def __init__(self, stream: TextIO = sys.stderr, *, tty: bool | None = None,
                 min_interval_s: float = 0.5, heartbeat_s: float = 30.0) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.min_interval_s = min_interval_s
        self.heartbeat_s = heartbeat_s
        self._last_heartbeat = time.monotonic()
        self._drawn_lines = 0
        self._last_draw = 0.0
        self._last_state: dict[str, tuple[str, int, str]] = {}

    def update(self, rows: Sequence[ProgressRow], *, force: bool = False) -> None:
        """Show ``rows``; on a TTY at most every ``min_interval_s`` unless ``force``."""
        if self.tty:
            now = time.monotonic()
            if not force and now - self._last_draw < self.min_interval_s:
                return
            lines = format_table(rows)
            if self._drawn_lines:
                self.stream.write(f"\x1b[{self._drawn_lines}F\x1b[J")
            self.stream.write("\n".join(lines) + "\n")
            self._drawn_lines = len(lines)
            self._last_draw = now
        else:
            stamp = time.strftime("%H:%M:%S")
            heartbeat = time.monotonic() - self._last_heartbeat >= self.heartbeat_s
            if heartbeat:
                self._last_heartbeat = time.monotonic()
            for r in rows:
                key = (r.state, r.attempt, r.reason)
                if self._last_state.get(r.name) == key and not (heartbeat and r.state == "running"):
                    continue
                self._last_state[r.name] = key
                detail = f" step {r.last_step}" if r.last_step is not None else ""
                if r.last_val_loss is not None:
                    detail += f" val/loss {r.last_val_loss:.4f}"
                why = f" ({r.reason})" if r.reason else ""
                self.stream.write(f"[{stamp}] {r.name}: {r.state} attempt {r.attempt}"
                                  f"{detail}{why}\n")
        self.stream.flush()
