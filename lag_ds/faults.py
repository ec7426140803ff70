"""Named crash points, so tests can kill a write at an exact instant (RELIABILITY.md #1, #9).

Why: "the destination is absent or complete, the source untouched" is a claim about *every*
instant of a checkpoint write, and a test can only check instants it can name. A writer marks
them with ``fault_point("name", directory)``; in production the call is one environment lookup
and nothing else (the points sit between files, never inside a per-element loop).

Two test hooks, set in the environment of the process under test:

* ``LAG_DS_FAULT_POINT=name`` (or ``name:N`` for the N-th time the point is reached): the
  process sends itself ``SIGKILL``. No ``except``, ``finally`` or ``atexit`` runs -- exactly what
  the OOM killer or a pre-empted node does -- so only the on-disk protocol (temporary sibling,
  manifest last, rename) can keep the output consistent.
* ``LAG_DS_FAULT_FILL=name[:N]``: the point fills the filesystem that holds ``directory`` with a
  file ``.lag_ds_fault_fill-<pid>`` inside it, so the *next* write fails with ENOSPC. This is the
  deterministic form of "the disk filled up after the free-space check passed" (another writer
  on the same disk); the filler lives in the directory being written, so the writer's own
  clean-up must remove it.

Example::

    LAG_DS_FAULT_POINT=deepspeed.param_written:3 python tools/grow_checkpoint.py --src A --dst B ...
    # -> killed by SIGKILL (exit -9) right after the third parameter's files were written
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

KILL_ENV = "LAG_DS_FAULT_POINT"
FILL_ENV = "LAG_DS_FAULT_FILL"
FILL_PREFIX = ".lag_ds_fault_fill-"

_hits: dict[str, int] = {}


def _fires(spec: str | None, name: str) -> bool:
    """Whether ``spec`` (``name`` or ``name:N``) names this hit of ``name`` (counted per spec)."""
    if not spec:
        return False
    point, _, nth = spec.partition(":")
    if point != name:
        return False
    _hits[spec] = _hits.get(spec, 0) + 1
    return _hits[spec] == (int(nth) if nth else 1)


def fault_point(name: str, directory: Path | None = None) -> None:
    """A named instant of a write; a no-op unless a test hook in the environment names it."""
    environ = os.environ
    if KILL_ENV not in environ and FILL_ENV not in environ:
        return
    if _fires(environ.get(FILL_ENV), name):
        if directory is None:
            raise AssertionError(f"fault point {name} has no directory to fill")
        fill_filesystem(Path(directory))
    if _fires(environ.get(KILL_ENV), name):
        os.kill(os.getpid(), signal.SIGKILL)


def fill_filesystem(directory: Path) -> Path:
    """Write zeros into ``directory/.lag_ds_fault_fill-<pid>`` until the filesystem is full."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{FILL_PREFIX}{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    size = 1 << 20
    try:
        while size:  # on ENOSPC retry smaller, until not even one byte fits
            try:
                os.write(fd, bytes(size))
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                size //= 16
    finally:
        os.close(fd)
    return path
