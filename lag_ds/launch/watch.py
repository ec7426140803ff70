"""Incremental reader of a running job's ``metrics.jsonl``: progress and non-finite losses.

The supervisor polls every job every fraction of a second, so re-reading whole files would cost
O(length) per poll; this reader keeps a byte offset and only ever consumes *complete* lines (the
trainer may be mid-write), leaving a partial line for the next poll.

It feeds three decisions (RELIABILITY item 7):

* progress -- a new complete record resets the hang timer;
* divergence -- a NaN/inf ``train/loss`` or ``val/loss*`` value stops the job at once, before it
  burns its remaining steps (the trainer itself exits 3 on a non-finite loss; this is the second
  line of defence for a trainer that does not);
* display -- first/last step, the last ``val/loss`` and ``train/loss``, tokens/s, and the
  speed in steps/s (from the records' ``wall_time``) that the ETA is computed from.

A complete line that is not a JSON object with an integer ``step`` raises ``ValueError`` naming
``file:line``: the selector would refuse the file later anyway, better to say so now.

Example::

    >>> w = MetricsWatcher(Path("runs/c0/metrics.jsonl"))            # doctest: +SKIP
    >>> w.poll(), w.last_step, w.non_finite                           # doctest: +SKIP
    (3, 300020, None)
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from lag_ds.metrics_schema import (
    STEP,
    TRAIN_LOSS,
    TRAIN_TOKENS_PER_S,
    VAL_LOSS,
    WALL_TIME,
    is_loss_tag,
    parse_record,
)


class MetricsWatcher:
    """Tail of one metrics file; call :meth:`poll` repeatedly."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._since = time.time()  # speed counts only records written after the watch began:
        # a resumed job's file also holds the steps of earlier rounds, long ago
        self.records_seen = 0
        """Records consumed over the watcher's life (never reset): the progress counter."""
        self._reset()

    def _reset(self) -> None:
        self._offset = 0
        self._tail = b""  # the last bytes consumed, to notice a file rewritten under us
        self._line_number = 0
        self.num_records = 0
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.last_val_loss: float | None = None
        self.last_val_step: int | None = None
        self.last_train_loss: float | None = None
        self.last_tokens_per_s: float | None = None
        self.non_finite: tuple[int, str] | None = None
        """(step, tag) of the first non-finite loss seen."""
        self._rate_origin: tuple[int, float] | None = None  # (step, wall time) of the 1st step
        self._rate_last: tuple[int, float] | None = None

    @property
    def steps_per_s(self) -> float | None:
        """Training speed over the records seen (their ``wall_time``), None before two steps."""
        if self._rate_origin is None or self._rate_last is None:
            return None
        steps = self._rate_last[0] - self._rate_origin[0]
        seconds = self._rate_last[1] - self._rate_origin[1]
        return steps / seconds if steps > 0 and seconds > 0 else None

    def poll(self) -> int:
        """Consume new complete lines; returns how many records were read.

        A resumed trainer truncates the steps after its checkpoint and appends again; if the
        bytes before our offset are no longer the ones we read, the file is read from the start.
        """
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        with open(self.path, "rb") as f:
            f.seek(self._offset - len(self._tail))
            if size < self._offset or f.read(len(self._tail)) != self._tail:
                self._reset()
                f.seek(0)
            chunk = f.read(max(0, size - self._offset))
        end = chunk.rfind(b"\n")
        if end < 0:
            return 0  # nothing new, or only a partial line so far
        count = 0
        for raw in chunk[:end].split(b"\n"):
            self._line_number += 1
            self._consume(raw)
            count += 1
        self._offset += end + 1
        self._tail = chunk[max(0, end + 1 - 64):end + 1]
        self.records_seen += count
        return count

    def _consume(self, raw: bytes) -> None:
        record = parse_record(raw, where=f"{self.path}:{self._line_number}")
        step = record[STEP]
        self.num_records += 1
        if self.first_step is None:
            self.first_step = step
        self.last_step = step
        for tag, value in record.items():
            if is_loss_tag(tag) and not math.isfinite(value) and self.non_finite is None:
                self.non_finite = (step, tag)
        if VAL_LOSS in record:
            self.last_val_loss = float(record[VAL_LOSS])
            self.last_val_step = step
        if TRAIN_LOSS in record:
            self.last_train_loss = float(record[TRAIN_LOSS])
            wall = record.get(WALL_TIME)
            wall = float(wall) if isinstance(wall, (int, float)) else time.time()
            if wall >= self._since:
                if self._rate_origin is None:
                    self._rate_origin = (step, wall)
                self._rate_last = (step, wall)
        tokens = record.get(TRAIN_TOKENS_PER_S)
        if isinstance(tokens, (int, float)) and not isinstance(tokens, bool):
            self.last_tokens_per_s = float(tokens)


def last_status_line(log_path: Path, prefix: str, *, max_bytes: int = 65536) -> str | None:
    """The newest line of a job's output that starts with ``prefix`` (its own status lines,
    e.g. "preparing data ..."), stripped of the prefix; None when there is none yet.

    Only the last ``max_bytes`` are read, so this stays cheap on a long log; progress-bar
    carriage returns are treated as line ends.
    """
    try:
        with open(log_path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    for line in reversed(tail.replace("\r", "\n").splitlines()):
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return None
