"""Content hashing, atomic writes and inter-process file locks for the data cache.

Why: every artefact of the data pipeline (demo corpus, SentencePiece model, ``.bin/.idx``
token files) is built once and then reused by every rank of every run. Three rules make that
safe without a coordinator:

* **Keyed by content.** A cache entry's name is a hash of what it was built from
  (:func:`hash_files`, :func:`hash_json`), so a changed corpus or parameter builds a new
  entry instead of silently reusing a stale one.
* **Atomic publication.** Builders write ``.<name>.tmp-<pid>-<rand>`` and ``os.replace`` it onto
  the final name (:func:`temp_path`, :func:`atomic_write_text`). A reader therefore never sees
  a half-written file; a crashed build leaves only a temp file that is ignored.
* **One builder at a time.** :func:`file_lock` takes an exclusive ``fcntl.flock`` on a lock
  file. Each rank may call the builders independently: the first takes the lock and builds,
  the others block, then find the finished entry and return it.

Parameters: hashes are SHA-256 hex digests; files are read in 1 MiB blocks.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lag_ds.atomic_io import atomic_write_text, temp_sibling  # noqa: F401 (re-exported)

_BLOCK = 1 << 20


def hash_json(obj: Any) -> str:
    """SHA-256 of ``obj`` serialised as canonical JSON (sorted keys, no whitespace)."""
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def hash_files(paths: Iterable[Path], *, root: Path | None = None) -> str:
    """SHA-256 over the names (relative to ``root`` when given) and bytes of ``paths``, in order.

    Names are part of the hash so that renaming or reordering files changes the key.
    """
    h = hashlib.sha256()
    for path in paths:
        name = str(path.relative_to(root)) if root is not None else path.name
        h.update(name.encode("utf-8") + b"\0")
        h.update(str(path.stat().st_size).encode("ascii") + b"\0")
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
    return h.hexdigest()


def temp_path(final: Path) -> Path:
    """A unique sibling of ``final`` to write into before ``os.replace``-ing it onto ``final``."""
    return temp_sibling(final)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if missing) for the block.

    Works between processes and between threads that each enter this context (each call opens
    its own file description). Blocks until the lock is free.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
