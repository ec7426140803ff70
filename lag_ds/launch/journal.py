"""Append-only, fsynced journal of candidate state changes (RELIABILITY item 8).

The orchestrator may be SIGKILLed at any moment; what it knew must survive.  Every state change
is one JSON line, appended and fsynced *before* the orchestrator acts on it being durable
(a ``running`` record is written right after the process starts, with the pid, process group and
start time needed to find and recognise it again).  Replaying the file gives each candidate's last
record, from which :mod:`lag_ds.launch.supervisor` decides to skip, adopt or restart.

Why a log and not a state file rewritten in place: appends are the cheapest durable write, history
is kept for post-mortems (attempts, reasons, pids), and a crash can only tear the *last* line.
A torn last line (no trailing newline) was never acknowledged, so it is ignored and the next
append cuts it off; a bad line anywhere else means the file is not ours or is
corrupt, which is an error naming ``file:line`` -- never a silent fresh start.

States: ``pending`` (queued, possibly for a retry), ``running``, ``finished``, ``failed``.
Just before a process is started, a ``pending`` record with reason ``launching`` and the slice and
port is written; if the orchestrator dies before the ``running`` record, the next one still knows
where that process runs.

Example::

    >>> j = Journal("runs/lag/journal.jsonl")                          # doctest: +SKIP
    >>> j.append(JournalRecord(candidate="c0", state="pending", attempt=1))  # doctest: +SKIP
    >>> j.replay()["c0"].state                                          # doctest: +SKIP
    'pending'
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATES = ("pending", "running", "finished", "failed")
FINAL_STATES = ("finished", "failed")


@dataclass(frozen=True, kw_only=True)
class JournalRecord:
    """One state change of one candidate."""

    candidate: str
    state: str
    attempt: int
    """1 for the first try; +1 per retry after a failure (a restart of an interrupted run keeps
    its attempt number: the trainer resumes, it does not start over)."""
    pid: int | None = None
    """Pid of the process-group leader (the launcher process)."""
    pgid: int | None = None
    start_ticks: int | None = None
    """Leader's start time (/proc, clock ticks since boot): tells our job from a reused pid."""
    port: int | None = None
    include: str | None = None
    """The slice (DeepSpeed ``--include`` spec) the job was launched on."""
    exit_code: int | None = None
    reason: str = ""
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"JournalRecord: state must be one of {STATES}, got {self.state!r}")
        if self.attempt < 1:
            raise ValueError(f"JournalRecord: attempt must be >= 1, got {self.attempt}")
        if self.state == "running" and (self.pid is None or self.pgid is None):
            raise ValueError(f"JournalRecord {self.candidate!r}: a running record needs pid/pgid")

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


def _parse(text: str, *, where: str) -> JournalRecord:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON ({err.msg})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object")
    expected = set(JournalRecord.__dataclass_fields__)
    if set(raw) != expected:
        raise ValueError(f"{where}: keys {sorted(raw)} != {sorted(expected)}")
    try:
        return JournalRecord(**raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


class Journal:
    """An append-only JSONL file; see the module docstring."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def records(self) -> list[JournalRecord]:
        """Every complete record in order.

        A record counts once its newline is written: a final line without one was never
        acknowledged (the writer died inside ``os.write``) and is ignored, parseable or not.
        """
        if not self.path.exists():
            return []
        lines = self.path.read_bytes().split(b"\n")[:-1]  # drops "" or the torn tail
        return [_parse(line.decode("utf-8", errors="replace"), where=f"{self.path}:{number}")
                for number, line in enumerate(lines, start=1)]

    def replay(self) -> dict[str, JournalRecord]:
        """Each candidate's latest record."""
        latest: dict[str, JournalRecord] = {}
        for record in self.records():
            latest[record.candidate] = record
        return latest

    def _cut_torn_tail(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def append(self, record: JournalRecord) -> None:
        """Append one record and fsync it (and the directory, when the file is new)."""
        new = not self.path.exists()
        if new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self._cut_torn_tail()
        line = json.dumps(asdict(record), allow_nan=False, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
