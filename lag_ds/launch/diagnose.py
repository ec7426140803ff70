"""What a hung job was waiting on: stack dumps of its ranks, turned into a one-line hint.

Before the supervisor kills a job for making no progress it asks the ranks for their stacks:
the trainer registers ``faulthandler`` on ``SIGUSR1`` (:func:`register_stack_dump`, called first
thing in ``lag_ds.train.main``), writing every thread's stack to
``$LAG_DS_STACK_DUMP_DIR/stack-rank<R>.txt``; the launcher sets that variable to the job's run
directory.  SIGUSR1 goes only to processes of the job's group that catch, block or ignore it
(``SigCgt``/``SigBlk``/``SigIgn`` in ``/proc/<pid>/status``) -- to the shell wrapper or the
DeepSpeed runner its default action would be to terminate, losing the exit status.  ``srun``
blocks it and takes it with ``sigwait`` in its signal thread, forwarding it to the step's tasks.

:func:`summarize_stack` reads a dump and names the wait: a JIT-build lock (``FileBaton.wait``), a
collective (``torch.distributed``), checkpoint I/O, or else the innermost frame of the main
thread.  A rank in state ``T`` (SIGSTOP, a debugger) cannot dump; it is named as stopped.

Example::

    >>> summarize_stack('Current thread 0x1 (most recent call first):\\n'
    ...                 '  File "/x/torch/utils/file_baton.py", line 50 in wait\\n')
    'waiting on a JIT-build lock (torch FileBaton.wait)'
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

STACK_DUMP_DIR_ENV = "LAG_DS_STACK_DUMP_DIR"
STACK_FILE_GLOB = "stack-rank*.txt"
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')
_THREAD = re.compile(r"^(Current thread|Thread) 0x[0-9a-f]+")
LOCK_WAIT = "waiting on a JIT-build lock (torch FileBaton.wait)"
_keep_open: list[TextIO] = []


def register_stack_dump(signum: int = signal.SIGUSR1) -> Path | None:
    """In a trainer rank: dump all threads' stacks on ``signum`` to
    ``$LAG_DS_STACK_DUMP_DIR/stack-rank<RANK>.txt`` (stderr when the variable is unset).
    Returns the file's path, or None for stderr."""
    import faulthandler

    directory = os.environ.get(STACK_DUMP_DIR_ENV)
    if not directory:
        faulthandler.register(signum, all_threads=True)
        return None
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    path = Path(directory) / f"stack-rank{rank}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    file = open(path, "a")  # noqa: SIM115 -- faulthandler writes to its fd until exit
    _keep_open.append(file)
    faulthandler.register(signum, file=file, all_threads=True)
    return path


def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def catches(pid: int, signum: int) -> bool:
    """Whether ``signum`` would not kill ``pid``: it has a handler, blocks or ignores it."""
    status = _status(pid)
    masks = [status.get(k) for k in ("SigCgt", "SigBlk", "SigIgn")]
    return any(m is not None and int(m, 16) >> (signum - 1) & 1 for m in masks)


def is_stopped(pid: int) -> bool:
    """State T (stopped by a signal) or t (tracing stop)."""
    return _status(pid).get("State", "").strip()[:1] in ("T", "t")


def rank_of(pid: int) -> str | None:
    """``RANK`` (or ``SLURM_PROCID``) from the process's environment, when readable."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    env = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    value = env.get(b"RANK") or env.get(b"SLURM_PROCID")
    return value.decode() if value is not None else None


def label(pid: int) -> str:
    """``rank R`` when the process has a rank, else ``pid N``."""
    rank = rank_of(pid)
    return f"rank {rank}" if rank is not None else f"pid {pid}"


def send_dump_signal(pids: Sequence[int], signum: int = signal.SIGUSR1) -> list[int]:
    """Send ``signum`` to those of ``pids`` that catch it; returns them."""
    sent = []
    for pid in pids:
        if catches(pid, signum):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                continue
            sent.append(pid)
    return sent


def _threads(text: str) -> list[list[tuple[str, int, str]]]:
    """Frames (file, line, function) per thread, innermost first, the current thread first."""
    threads: list[tuple[bool, list[tuple[str, int, str]]]] = []
    for line in text.splitlines():
        if m := _THREAD.match(line):
            threads.append((m[1] == "Current thread", []))
        elif (m := _FRAME.match(line)) and threads:
            threads[-1][1].append((m["file"], int(m["line"]), m["func"]))
    threads.sort(key=lambda t: not t[0])
    return [frames for _, frames in threads if frames]


def summarize_stack(text: str) -> str | None:
    """A phrase naming what the dumped process waits on, or None for an empty dump."""
    threads = _threads(text)
    if not threads:
        return None
    every = [f for frames in threads for f in frames]
    if any(f.endswith("file_baton.py") and fn == "wait" for f, _, fn in every):
        return LOCK_WAIT
    for frames in threads:
        for file, _, func in frames:
            if "torch/distributed" in file and not func.startswith("_") and func != "wrapper":
                return f"in a collective (torch.distributed {func})"
            if "deepspeed/comm" in file and not func.startswith("_"):
                return f"in a collective (deepspeed.comm {func})"
    for frames in threads:
        for file, _, func in frames:
            if file.endswith("torch/serialization.py") or "checkpoint" in func:
                return f"in checkpoint I/O ({os.path.basename(file)} {func})"
    file, line, func = threads[0][0]
    return f"at {os.path.basename(file)}:{line} in {func}"


def stack_file_sizes(run_dir: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in sorted(Path(run_dir).glob(STACK_FILE_GLOB))}


def new_dumps(run_dir: Path, before: dict[Path, int]) -> dict[str, str]:
    """Text each ``stack-rank<R>.txt`` gained since ``before``, keyed by rank."""
    out = {}
    for path, size in stack_file_sizes(run_dir).items():
        start = before.get(path, 0)
        if size > start:
            with open(path, "rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            out[path.name[len("stack-rank"):-len(".txt")]] = text
    return out


@dataclass(kw_only=True)
class StackRequest:
    """SIGUSR1 sent to a hung job's processes; :meth:`done` once the dumps came back (the stack
    files grew, then stayed the same for 0.3 s) or ``wait_s`` passed."""

    run_dir: Path
    deadline: float
    sizes: dict[Path, int]
    """Stack file sizes before the request: what was there belongs to earlier dumps."""
    signalled: int
    stopped: tuple[str, ...]
    """Processes in state T (they cannot answer), as ``rank R`` or ``pid N``."""
    _seen: tuple[int, float] = (0, 0.0)

    @classmethod
    def send(cls, pids: Sequence[int], *, run_dir: Path, wait_s: float) -> "StackRequest":
        stopped = tuple(label(p) for p in pids if is_stopped(p) and catches(p, signal.SIGUSR1))
        sizes = stack_file_sizes(run_dir)
        signalled = len(send_dump_signal(pids))
        now = time.monotonic()
        return cls(run_dir=Path(run_dir), deadline=now + (wait_s if signalled else 0.0),
                   sizes=sizes, signalled=signalled, stopped=stopped, _seen=(0, now))

    def done(self) -> bool:
        now = time.monotonic()
        if now >= self.deadline:
            return True
        grown = sum(max(0, n - self.sizes.get(p, 0))
                    for p, n in stack_file_sizes(self.run_dir).items())
        if grown != self._seen[0]:
            self._seen = (grown, now)
            return False
        return grown > 0 and now - self._seen[1] >= 0.3

    def collect(self) -> dict[str, str]:
        """The new dumps, by rank."""
        return new_dumps(self.run_dir, self.sizes)


def hang_hint(dumps: dict[str, str], *, stopped: Sequence[str] = (), signalled: int,
              run_dir: Path, lock_notes: Sequence[str] = ()) -> str:
    """The hint appended to ``hung: no progress for Ns``; ``stopped`` names processes in state
    T (``rank 1`` or ``pid 123``)."""
    parts = [f"{who} is stopped (SIGSTOP?)" for who in stopped]
    by_wait: dict[str, list[str]] = {}
    for rank in sorted(dumps, key=lambda r: (len(r), r)):
        what = summarize_stack(dumps[rank])
        if what is not None:
            by_wait.setdefault(what, []).append(rank)
    for what, ranks in by_wait.items():
        who = "rank " + ranks[0] if len(ranks) == 1 else "ranks " + ",".join(ranks)
        parts.append(f"{who} {what}")
    parts += list(lock_notes)
    if dumps:
        parts.append(f"stacks in {Path(run_dir) / STACK_FILE_GLOB}")
    elif not signalled and not stopped:
        parts.append("no stack dump: no process of the job handles SIGUSR1")
    elif not stopped:
        parts.append("no stack dump came back")
    return "; ".join(parts)


_ERROR_LINE = re.compile(r"(?:^|:\s)((?:[A-Za-z_][\w.]*(?:Error|Exception)|error)(?::\s.*)?)$")
_LAUNCH_HEADER = "=== lag_ds.launch 2"  # written by process.spawn at each launch


def last_error_line(log_path: Path, *, max_bytes: int = 65536,
                    max_chars: int = 200) -> str | None:
    """The last line of the latest attempt in ``launcher.log`` that reads like an error
    (``SomeError: ...``, ``error: ...``, also behind a ``host: `` or ``[rank1]: `` prefix)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(_LAUNCH_HEADER)]
    for line in reversed(lines[starts[-1] if starts else 0:]):
        m = _ERROR_LINE.search(line.strip())
        if m and not line.startswith("=== lag_ds.launch"):
            found = m[1]
            return found if len(found) <= max_chars else found[:max_chars - 3] + "..."
    return None


def log_dumps(log_path: Path, header: str, dumps: dict[str, str]) -> None:
    """Append the hint and the dumps to the job's ``launcher.log``."""
    with open(log_path, "a") as log:
        log.write(f"=== lag_ds.launch: {header}\n")
        for rank in sorted(dumps, key=lambda r: (len(r), r)):
            log.write(f"--- stack of rank {rank} ---\n{dumps[rank].rstrip()}\n")

