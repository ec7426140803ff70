"""Write a checkpoint directory so that it is either absent or complete (RELIABILITY.md #1, #7, #9).

Everything is written into a temporary *sibling* ``.<name>.partial-<pid>`` (same filesystem, so
the final ``rename`` is atomic; partials left by killed processes are removed on the next run),
each file fsynced; the manifest is written last; then the directory is renamed into place and its
parent fsynced. On any exception the partial directory is removed. The destination must not exist
beforehand: we never merge into or overwrite a checkpoint.

Disk full (#9): writers call :func:`check_free_space` with an estimate of all they will write
before they start; a write that still runs out of space (another writer filled the disk) is
turned into a one-line :class:`DiskFullError` naming the destination, after the partial directory
(and with it every byte written) is removed. ``fault_point`` marks the instants the SIGKILL tests
stop a write at (:mod:`lag_ds.faults`).

Example::

    with AtomicDirectory(Path("out/grown")) as tmp:
        save_tensor_file(tmp / "a.pt", {...})
        write_manifest(tmp, source=..., plan=..., extra={})
    # out/grown now exists, complete, with manifest.json
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from types import TracebackType

from lag_ds.atomic_io import fsync_dir
from lag_ds.faults import fault_point


class DestinationExistsError(ValueError):
    pass


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def human_bytes(num: float) -> str:
    """``813.57 KB``: tiny test disks and real ones in the same error message."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(num) < 1000 or unit == "GB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.2f} {unit}"
        num /= 1000
    raise AssertionError("unreachable")


def stored_size(payload: int, *, overhead: int = 1536, block: int = 4096) -> int:
    """Disk space a file with ``payload`` bytes of tensor data takes: ``torch.save``'s zip
    container adds ~1.4 KB, and the filesystem rounds up to whole blocks (which dominates for the
    many small per-parameter files of the universal layout)."""
    return -(-(payload + overhead) // block) * block


class DiskFullError(ValueError):
    """Not enough space for a write (refused up front, or ENOSPC half-way; nothing was left)."""


def free_bytes(directory: Path) -> int:
    """Bytes this process may still write there (root may also use the reserved blocks)."""
    st = os.statvfs(directory)
    return st.f_frsize * (st.f_bfree if os.geteuid() == 0 else st.f_bavail)


def check_free_space(target_dir: Path, needed_bytes: int, *, destination: Path | None = None,
                     margin: float = 1.05) -> None:
    """Refuse to start a large write that cannot fit (clean failure instead of a half-written disk).

    ``needed_bytes`` is the writer's estimate of everything it will write; ``destination`` is
    named in the error (the directory that was not written)."""
    free = free_bytes(target_dir)
    if free < needed_bytes * margin:
        what = f"{destination}" if destination is not None else f"a write in {target_dir}"
        raise DiskFullError(f"not enough free space for {what}: need ~{human_bytes(needed_bytes)}"
                            f" (+{margin - 1:.0%} margin), {target_dir} has {human_bytes(free)} free")


def is_disk_full(exc: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of space.

    ``torch.save`` reports ENOSPC as a bare ``RuntimeError`` ("basic_ios::clear: iostream
    error"), safetensors as ``SafetensorError`` ("os error 28"), so besides ``errno`` we look at
    the message and at what is left on the filesystem (under 1 MiB: it is full)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "os error 28" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return free_bytes(directory) < (1 << 20)
    except OSError:
        return False


def disk_full_error(exc: BaseException, directory: Path, *, writing: Path) -> DiskFullError:
    """The one-line error for a write of ``writing`` that ran out of space in ``directory``."""
    first = (str(exc).splitlines() or [""])[0][:120]
    return DiskFullError(f"disk full while writing {writing} (no space left in {directory}; "
                         f"{type(exc).__name__}: {first}); the partial output was removed")


def _pid_alive(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class AtomicDirectory:
    """Context manager yielding a temporary directory that becomes ``final`` on success."""

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.tmp = self.final.parent / f".{self.final.name}.partial-{os.getpid()}"

    def __enter__(self) -> Path:
        if self.final.exists():
            raise DestinationExistsError(f"destination already exists: {self.final} (refusing to overwrite)")
        if not self.final.parent.is_dir():
            raise ValueError(f"parent directory of destination does not exist: {self.final.parent}")
        for stale in self.final.parent.glob(f".{self.final.name}.partial-*"):
            if not _pid_alive(stale.name.rsplit("-", 1)[-1]):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
        fault_point("atomic.before_partial")
        self.tmp.mkdir()
        fault_point("atomic.partial_created", self.tmp)
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            try:
                self._commit()
                return
            except BaseException as failure:  # noqa: BLE001 - re-raised below, after clean-up
                exc = failure
        full = (isinstance(exc, Exception) and not isinstance(exc, ValueError)
                and is_disk_full(exc, self.final.parent))
        shutil.rmtree(self.tmp, ignore_errors=True)
        if full:
            raise disk_full_error(exc, self.final.parent, writing=self.final) from exc
        if exc_type is None:
            raise exc

    def _commit(self) -> None:
        """fsync every file and directory, then rename into place and fsync the parent."""
        fault_point("atomic.before_fsync", self.tmp)
        for root, _, files in os.walk(self.tmp):
            for name in files:
                fsync_file(Path(root) / name)
            fsync_dir(Path(root))
        fault_point("atomic.fsynced", self.tmp)
        if self.final.exists():  # someone raced us: keep theirs, drop ours
            raise DestinationExistsError(f"destination appeared while writing: {self.final}")
        os.rename(self.tmp, self.final)
        fault_point("atomic.renamed", self.final)
        fsync_dir(self.final.parent)
