"""DeepSpeed's CPU shared-memory all-reduce segments: name them, unlink them, sweep the leaked ones.

Why: on the CPU accelerator every rank of a job whose ranks are all on one host creates
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (about 66 MB of
tmpfs, i.e. RAM) and never unlinks it, not even on a clean exit (DeepSpeed 0.19's ``shm.cpp`` has
a ``shared_close`` that nothing calls). A LAG race runs many short jobs, so the segments pile up:
on this box 320 of them held 21 GB and the next compile was OOM-killed.

Two remedies, both here:

* :func:`unlink_own_segment` — a rank removes its *name* as soon as every rank has mapped every
  peer's segment (the trainer calls it after a barrier that follows ``init_distributed``). The
  mappings stay valid, and the kernel frees the memory when the last rank exits, however it exits
  (SIGKILL included).
* :func:`clear_stale_segments` — the supervisor (and the test suite) removes segments that no live
  process maps and that are older than a grace period: left by processes that died before the
  unlink (killed during start-up) or by DeepSpeed programs that are not ours.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"
GRACE_S = 60.0  # a segment younger than this may belong to a rank that is still starting up


def segment_name(env: Mapping[str, str], *, uid: int | None = None) -> str | None:
    """The name DeepSpeed gives this rank's segment, or None when the env does not say (no RANK)."""
    if "RANK" not in env:
        return None
    uid = os.getuid() if uid is None else uid
    return (f"{PREFIX}_{uid}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_"
            f"{env['RANK']}")


def unlink_own_segment(env: Mapping[str, str] | None = None, *, shm_dir: Path = SHM_DIR) -> bool:
    """Remove this rank's segment name (call only after every rank has mapped every peer's).

    Returns whether a segment was removed; a job whose ranks are not all local has none.
    """
    name = segment_name(os.environ if env is None else env)
    if name is None:
        return False
    try:
        (shm_dir / name).unlink()
    except FileNotFoundError:
        return False
    return True


def mapped_paths(proc: Path = Path("/proc")) -> set[str]:
    """Every file path some live process maps (from ``/proc/*/maps``; unreadable ones skipped)."""
    paths: set[str] = set()
    for maps in proc.glob("[0-9]*/maps"):
        try:
            text = maps.read_text(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        for line in text.splitlines():
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].startswith("/"):
                paths.add(fields[5].removesuffix(" (deleted)"))
    return paths


def stale_segments(shm_dir: Path = SHM_DIR, *, grace_s: float = GRACE_S,
                   mapped: Iterable[str] | None = None, now: float | None = None,
                   uid: int | None = None) -> list[Path]:
    """This user's DeepSpeed segments that nobody maps and that are older than ``grace_s``."""
    uid = os.getuid() if uid is None else uid
    candidates = sorted(shm_dir.glob(f"{PREFIX}_{uid}_*"))
    if not candidates:
        return []
    mapped = mapped_paths() if mapped is None else set(mapped)
    now = time.time() if now is None else now
    stale = []
    for path in candidates:
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if age >= grace_s and str(path) not in mapped:
            stale.append(path)
    return stale


def clear_stale_segments(shm_dir: Path = SHM_DIR, *, grace_s: float = GRACE_S) -> list[str]:
    """Remove stale segments; one message per removal (with the memory it gives back)."""
    messages = []
    for path in stale_segments(shm_dir, grace_s=grace_s):
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        messages.append(f"removed leaked DeepSpeed shm segment {path} ({size / 1e6:.0f} MB)")
    return messages
