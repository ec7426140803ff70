"""Process groups for jobs: start, recognise after a restart, read the exit status, stop.

Each job runs in its own session (``start_new_session=True``), so the DeepSpeed runner, its
``launch.py`` and every rank share one process group that can be signalled as a unit, and so the
job survives the orchestrator being SIGKILLed (RELIABILITY item 8).

Two problems follow from surviving, and are solved here:

* **Recognising the job again.**  A pid alone may have been reused by the time the orchestrator
  comes back, so the journal also stores the leader's start time (field 22 of ``/proc/<pid>/stat``);
  a live process with the same pid *and* start time is our job.  Zombies count as dead.
* **Learning how an adopted job ended.**  Only a parent can ``waitpid``; the new orchestrator is
  not the parent.  So the command runs under a tiny ``sh`` wrapper that writes its exit code to
  ``launcher.exit`` (temp + rename) when it ends.  A job killed by a signal writes nothing, and
  no file then means "ended without a status".
* **Finding a job the journal never heard of.**  If the orchestrator dies between starting a job
  and journaling its pid, the job runs unrecorded.  The wrapper therefore first writes its own pid
  to ``launcher.pid``; :func:`find_live_job` accepts that pid only if the process is a live
  wrapper whose command line names this job's exit file, so a reused pid is never mistaken
  for the job.

Linux-only (``/proc``), like DeepSpeed's multi-node launcher itself.

Example::

    >>> h = spawn(["python", "train.py"], env=os.environ, log_path=Path("run/launcher.log"),
    ...           exit_path=Path("run/launcher.exit"))              # doctest: +SKIP
    >>> is_alive(h)                                                   # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# $1 = exit file, $2 = pid file; the rest is the command.  Both files are written via rename so
# a reader never sees a half-written number.
_WRAPPER = ('f="$1"; p="$2"; shift 2; echo "$$" > "$p.tmp" && mv -f "$p.tmp" "$p"; '
            '"$@"; rc=$?; echo "$rc" > "$f.tmp" && mv -f "$f.tmp" "$f"; exit "$rc"')
_WRAPPER_NAME = "lag-job"


@dataclass(frozen=True, kw_only=True)
class ProcessHandle:
    """A job's process-group leader; ``popen`` is ``None`` for an adopted job (not our child)."""

    pid: int
    pgid: int
    start_ticks: int
    popen: subprocess.Popen | None = None


def wrap(argv: Sequence[str], *, exit_path: Path, pid_path: Path) -> list[str]:
    """``argv`` under ``sh`` that writes its pid to ``pid_path`` and its exit code to
    ``exit_path``."""
    return ["/bin/sh", "-c", _WRAPPER, _WRAPPER_NAME, str(exit_path), str(pid_path), *argv]


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the parenthesised command name), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()


def proc_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if there is no such process."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _is_running(fields: list[str] | None) -> bool:
    return fields is not None and fields[0] not in ("Z", "X")


def spawn(argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, exit_path: Path,
          pid_path: Path, cwd: Path | None = None) -> ProcessHandle:
    """Start ``argv`` in a new session, stdout+stderr appended to ``log_path``.

    The caller removes stale ``exit_path``/``pid_path`` *before* journaling the launch, so that
    whatever is found there later belongs to this launch.
    """
    if exit_path.exists() or pid_path.exists():
        raise ValueError(f"spawn: remove {exit_path} and {pid_path} before launching")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"=== lag_ds.launch {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{' '.join(argv)}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            wrap(argv, exit_path=exit_path, pid_path=pid_path), env=dict(env), cwd=cwd, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    ticks = proc_start_ticks(popen.pid)
    assert ticks is not None, "a child we have not reaped must have a /proc entry"
    return ProcessHandle(pid=popen.pid, pgid=popen.pid, start_ticks=ticks, popen=popen)


def find_live_job(*, exit_path: Path, pid_path: Path) -> ProcessHandle | None:
    """The live wrapper process of the job owning ``exit_path``, if there is one.

    Identity is the pid from ``pid_path`` plus a command line that is our wrapper naming this
    very ``exit_path`` -- a reused pid cannot match both.
    """
    try:
        text = pid_path.read_text().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        raise ValueError(f"{pid_path}: expected a pid, got {text!r}")
    pid = int(text)
    fields = _stat_fields(pid)
    if not _is_running(fields):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return None
    if argv[3:5] != [_WRAPPER_NAME.encode(), str(exit_path).encode()]:
        return None
    return ProcessHandle(pid=pid, pgid=int(fields[2]), start_ticks=int(fields[19]), popen=None)


def is_alive(handle: ProcessHandle) -> bool:
    """Whether the leader still runs (reaps it when it is our child)."""
    if handle.popen is not None:
        return handle.popen.poll() is None
    fields = _stat_fields(handle.pid)
    return _is_running(fields) and int(fields[19]) == handle.start_ticks


def read_exit_code(exit_path: Path) -> int | None:
    """The code the wrapper recorded, or None if the command did not end on its own."""
    try:
        text = exit_path.read_text().strip()
    except FileNotFoundError:
        return None
    if not text.lstrip("-").isdigit():
        raise ValueError(f"{exit_path}: expected an exit code, got {text!r}")
    return int(text)


def group_members(pgid: int, *, started_since: int = 0) -> list[int]:
    """Live (non-zombie) processes in group ``pgid`` started at or after ``started_since``.

    The start-time floor keeps an unrelated group that happens to reuse the number out.
    """
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if _is_running(fields) and int(fields[2]) == pgid and int(fields[19]) >= started_since:
            members.append(int(entry.name))
    return members


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to the whole group; a group that is already gone is fine."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def kill_leftovers(pgid: int, *, started_since: int, timeout_s: float = 5.0) -> None:
    """SIGKILL whatever is left of a group whose leader ended, and wait until it is gone.

    Needed before a candidate is relaunched: two live processes for one candidate would write
    the same run directory.
    """
    deadline = time.monotonic() + timeout_s
    while members := group_members(pgid, started_since=started_since):
        if time.monotonic() > deadline:
            raise RuntimeError(f"process group {pgid}: {members} survive SIGKILL")
        signal_group(pgid, signal.SIGKILL)
        time.sleep(0.02)
