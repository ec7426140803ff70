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
    total_step: int | None = None
    """The step the job ends at (``JobSpec.total_steps``), for "step/total" and the ETA."""
    train_loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    """Seconds until the job reaches ``total_step`` at its measured speed."""
    status: str = ""
    """The job's newest status line (e.g. "preparing data"), shown until steps are logged."""


def _fmt_loss(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def format_duration(seconds: float | None) -> str:
    """``75 -> '1m15s'``, ``3725 -> '1h02m'``; '?' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _fmt_step(r: ProgressRow) -> str:
    if r.last_step is None:
        return "-"
    return str(r.last_step) if r.total_step is None else f"{r.last_step}/{r.total_step}"


def describe_running(r: ProgressRow) -> str:
    """One line of what a running job is doing: its step, losses, speed and ETA, or its latest
    status line while it has not logged a step yet."""
    if r.last_step is None:
        return f"starting: {r.status}" if r.status else "starting"
    parts = [f"step {_fmt_step(r)}"]
    if r.total_step and r.steps_done is not None and r.last_step <= r.total_step:
        todo = r.steps_done + r.total_step - r.last_step  # this job's own steps, not the run's
        parts[0] += f" ({100 * r.steps_done / todo:.0f}%)" if todo else ""
    if r.train_loss is not None:
        parts.append(f"loss {r.train_loss:.4f}")
    if r.last_val_loss is not None:
        parts.append(f"val/loss {r.last_val_loss:.4f}")
    if r.tokens_per_s is not None:
        parts.append(f"{r.tokens_per_s:,.0f} tok/s")
    if r.eta_s is not None:
        parts.append(f"ETA {format_duration(r.eta_s)}")
    return " ".join(parts)


def format_table(rows: Sequence[ProgressRow]) -> list[str]:
    """The table as lines (a header with counts, then one line per candidate)."""
    counts = {s: sum(r.state == s for r in rows) for s in DISPLAY_STATES}
    header = "candidates: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    width = max([len("candidate")] + [len(r.name) for r in rows])
    lines = [header, f"{'candidate':<{width}}  {'state':<8}  try  {'steps':>7}  "
                     f"{'step':>13}  {'val loss':>8}  {'ETA':>6}  reason"]
    for r in rows:
        steps = "-" if r.steps_done is None else str(r.steps_done)
        eta = format_duration(r.eta_s) if r.eta_s is not None else "-"
        why = r.reason or (f"starting: {r.status}" if r.state == "running" and r.last_step is None
                           and r.status else "")
        lines.append(f"{r.name:<{width}}  {r.state:<8}  {r.attempt:>3}  {steps:>7}  "
                     f"{_fmt_step(r):>13}  {_fmt_loss(r.last_val_loss):>8}  {eta:>6}  {why}")
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

    def update(self, rows: Sequence[ProgressRow], *, force: bool = False,
               phase_eta_s: float | None = None) -> None:
        """Show ``rows``; on a TTY at most every ``min_interval_s`` unless ``force``.
        ``phase_eta_s``: the supervisor's estimate for all of its jobs, shown in the header."""
        if self.tty:
            now = time.monotonic()
            if not force and now - self._last_draw < self.min_interval_s:
                return
            lines = format_table(rows)
            if phase_eta_s is not None:
                lines[0] += f"; all done in ~{format_duration(phase_eta_s)}"
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
                detail = f" {describe_running(r)}" if r.state == "running" else ""
                why = f" ({r.reason})" if r.reason else ""
                self.stream.write(f"[{stamp}] {r.name}: {r.state} attempt {r.attempt}"
                                  f"{detail}{why}\n")
            if heartbeat and len(rows) > 1 and any(r.state == "running" for r in rows):
                counts = {s: sum(r.state == s for r in rows) for s in DISPLAY_STATES}
                eta = f"; all done in ~{format_duration(phase_eta_s)}" if phase_eta_s else ""
                self.stream.write(f"[{stamp}] " + ", ".join(
                    f"{n} {s}" for s, n in counts.items() if n) + eta + "\n")
        self.stream.flush()
