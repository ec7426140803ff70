"""The manifest that makes a directory a checkpoint: written last, sha256 + size of every file.

``manifest.json``::

    {"format": "lag_ds.checkpoint", "format_version": 1, "kind": "deepspeed-universal" | "hf-safetensors",
     "source": {...}, "plan": {...} | null, "extra": {...},
     "files": {"relative/path": {"size": int, "sha256": hex}, ...}}

``verify_manifest`` names every missing, truncated or altered file (RELIABILITY.md #2).
Hashing streams files in 8 MiB blocks, so it needs no memory beyond that.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from lag_ds.checkpoint.atomic import fsync_file
from lag_ds.faults import fault_point

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "lag_ds.checkpoint"
MANIFEST_VERSION = 1
_BLOCK = 8 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _hash_and_sync(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
        os.fsync(f.fileno())
    return h.hexdigest()


def _synced(path: Path, digest: str) -> str:
    fsync_file(path)
    return digest


class _HashingFile:
    """A write-only file for ``torch.save`` that hashes what passes through it.

    Each large chunk is hashed in the hasher's thread while this thread writes it (both release
    the GIL), and ``write`` returns only when both are done, so the caller's buffer is never read
    after it was handed back. Small chunks (zip headers, the pickle) are hashed inline."""

    def __init__(self, path: Path, pool: ThreadPoolExecutor) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._sha = hashlib.sha256()
        self._pool = pool

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        job = self._pool.submit(self._sha.update, view) if view.nbytes >= (1 << 20) else None
        if job is None:
            self._sha.update(view)
        try:
            done = 0
            while done < view.nbytes:  # Linux writes at most ~2 GiB per call
                done += os.write(self._fd, view[done:])
        finally:
            if job is not None:
                job.result()
        return view.nbytes

    def flush(self) -> None:
        pass

    def close(self) -> str:
        os.close(self._fd)
        return self._sha.hexdigest()


class BackgroundHasher:
    """Hash and fsync every file of a checkpoint write without re-reading it in the writer's way.

    Why: the manifest needs every file's sha256 and the atomic rename needs every file fsynced.
    Done after the last write, both re-read and flush the whole output while nothing else runs
    (about 15 % of a ZeRO-2 grow, profiled on a 2.7 GB checkpoint). Two ways in:

    * :meth:`save` is ``torch.save`` through a file that hashes the bytes as they are written,
      in a second thread while the write runs (no re-read of the output at all), then fsyncs in
      the background;
    * :meth:`add` hashes and fsyncs a file written elsewhere, in the background, as soon as it
      is complete (hashlib and file I/O release the GIL). Add a file only once it is closed.

    Either way it costs no memory to speak of. Give :meth:`results` to :func:`write_manifest` as
    ``known_hashes``.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lag_ds-hash")
        self._chunks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lag_ds-hash-chunk")
        self._jobs: dict[Path, Future[str]] = {}

    def add(self, path: Path) -> None:
        self._jobs[Path(path)] = self._pool.submit(_hash_and_sync, Path(path))

    def save(self, obj: Any, path: Path) -> None:
        """``torch.save(obj, path)``, hashed on the way out, fsynced in the background."""
        import torch

        path = Path(path)
        stream = _HashingFile(path, self._chunks)
        try:
            torch.save(obj, stream)
        finally:
            digest = stream.close()
        self._jobs[path] = self._pool.submit(_synced, path, digest)

    def results(self) -> dict[Path, str]:
        return {path: job.result() for path, job in self._jobs.items()}

    def __enter__(self) -> BackgroundHasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._chunks.shutdown(wait=True, cancel_futures=True)


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            path = Path(dirpath) / name
            if path.name != MANIFEST_NAME or path.parent != root:
                yield path


def write_manifest(
    root: Path, *, kind: str, source: dict[str, Any], plan: dict[str, Any] | None, extra: dict[str, Any],
    known_hashes: dict[Path, str] | None = None, progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Hash every file under ``root`` and write ``root/manifest.json`` (call it last).

    ``known_hashes`` maps a file's inode path to a hash already computed (hard-linked files from a
    verified source need not be re-read).
    """
    fault_point("manifest.start", root)  # every data file written, no manifest yet
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(_walk(root)):
        rel = path.relative_to(root).as_posix()
        digest = (known_hashes or {}).get(path) or sha256_file(path)
        files[rel] = {"size": path.stat().st_size, "sha256": digest}
        if progress:
            progress(1)
    manifest = {
        "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "kind": kind,
        "source": source, "plan": plan, "extra": extra, "files": files,
    }
    tmp = root / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    fault_point("manifest.tmp_written", root)  # a complete manifest under its temporary name
    os.replace(tmp, root / MANIFEST_NAME)
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{root}: no {MANIFEST_NAME} (not a complete lag_ds checkpoint)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt manifest ({exc})") from None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("format_version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: not a {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest")
    return manifest


def verify_manifest(root: Path) -> list[str]:
    """Problems found (empty = intact): one line per missing, resized, altered or unexpected file."""
    root = Path(root)
    manifest = read_manifest(root)
    problems = []
    for rel, meta in sorted(manifest["files"].items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != meta["size"]:
            problems.append(f"{path}: size {path.stat().st_size} != {meta['size']} (truncated or extended)")
        elif sha256_file(path) != meta["sha256"]:
            problems.append(f"{path}: sha256 mismatch (altered)")
    listed = set(manifest["files"])
    for path in _walk(root):
        if path.relative_to(root).as_posix() not in listed:
            problems.append(f"{path}: not in manifest")
    return problems


def check_source_manifest(src: Path) -> None:
    """Refuse a source whose lag_ds manifest (in ``src`` or, for a tag directory, the directory
    above) no longer matches its files; one-line ``ValueError`` naming the first bad file.

    Why: a flipped byte inside tensor data unpickles fine and would be grown silently; where a
    manifest exists, its sha256 is the only thing that can tell."""
    src = Path(src)
    for root in (src, src.parent):
        if (root / MANIFEST_NAME).is_file():
            problems = verify_manifest(root)
            if problems:
                raise ValueError(f"{problems[0]} ({len(problems)} problem(s) against "
                                 f"{root / MANIFEST_NAME}; source refused)")
            return
