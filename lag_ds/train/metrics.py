"""One metric logger: TensorBoard events + ``metrics.jsonl`` (what other tools read). Rank 0 only.

JSONL record and tag names: :mod:`lag_ds.metrics_schema` (the one place the launcher and the
selector read them from too).
Non-finite values are written as JSON ``NaN``/``Infinity`` (Python's json default) so that a
diverging run is visible to the selector rather than dropped.

On resume from step ``s`` the JSONL is rewritten without records past ``s`` and TensorBoard is
opened with ``purge_step=s + 1``, so a curve never shows the same step twice.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Mapping

from lag_ds.atomic_io import atomic_write_text
from lag_ds.metrics_schema import STEP, WALL_TIME

STATUS_PREFIX = "[lag_ds]"
"""Start of the trainer's status lines on stdout ("preparing data ...", "loading ..."); the
launcher's progress display shows the newest one while a job has not logged a step yet
(``JobSpec.status_prefix``)."""


class MetricLogger:
    def __init__(self, *, jsonl_path: Path, tb_dir: Path | None, resume_step: int | None, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self._file = None
        if not enabled:
            return
        jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and jsonl_path.exists():
            _truncate_after(jsonl_path, resume_step)
        self._file = jsonl_path.open("a")
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(log_dir=str(tb_dir), purge_step=purge)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {STEP: int(step), WALL_TIME: time.time(), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, float(value), global_step=step)

    def tb_scalar(self, tag: str, value: float, step: int) -> None:
        """A TensorBoard-only scalar on another axis (e.g. steps since growing)."""
        if self.enabled and self.writer is not None:
            self.writer.add_scalar(tag, float(value), global_step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, global_step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _truncate_after(path: Path, step: int) -> None:
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write
        if record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
