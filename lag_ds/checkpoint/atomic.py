"""Write a checkpoint directory so that it is either absent or complete (RELIABILITY.md #1, #7, #9).

Everything is written into a temporary *sibling* ``.<name>.partial-<pid>`` (same filesystem, so
the final ``rename`` is atomic; partials left by killed processes are removed on the next run), each file fsynced; the manifest is written last; then the
directory is renamed into place and its parent fsynced. On any exception the partial directory is
removed. The destination must not exist beforehand: we never merge into or overwrite a checkpoint.

Example::

    with AtomicDirectory(Path("out/grown")) as tmp:
        save_tensor_file(tmp / "a.pt", {...})
        write_manifest(tmp, source=..., plan=..., extra={})
    # out/grown now exists, complete, with manifest.json
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import TracebackType

from lag_ds.atomic_io import fsync_dir


class DestinationExistsError(ValueError):
    pass


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def check_free_space(target_dir: Path, needed_bytes: int, *, margin: float = 1.05) -> None:
    """Refuse to start a large write that cannot fit (clean failure instead of a half-written disk)."""
    free = shutil.disk_usage(target_dir).free
    if free < needed_bytes * margin:
        raise ValueError(f"not enough free space in {target_dir}: need ~{needed_bytes / 1e9:.2f} GB, have {free / 1e9:.2f} GB")


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
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for root, _, files in os.walk(self.tmp):
            for name in files:
                fsync_file(Path(root) / name)
            fsync_dir(Path(root))
        if self.final.exists():  # someone raced us: keep theirs, drop ours
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise DestinationExistsError(f"destination appeared while writing: {self.final}")
        os.rename(self.tmp, self.final)
        fsync_dir(self.final.parent)
