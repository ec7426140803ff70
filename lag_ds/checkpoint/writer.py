"""Save tensors in a background thread while the caller gathers the next ones, within a byte budget.

Why: growing a checkpoint is read-bound and write-bound at once, and done in one thread the two
take turns: gathering a tensor waits on the source's pages coming from disk, then ``torch.save``
waits on the destination's writes (CRC32, copying into the page cache, dirty-page throttling).
``cp`` keeps both in flight. Here the caller gathers tensor N+1 (memory copies that release the
GIL) while a writer thread saves tensor N (``torch.save`` writes a storage with the GIL
released), and :meth:`PipelinedWriter.save` first asks the kernel to read ahead the sources of
the tensor it is about to gather (``prefetch``, e.g. :func:`lag_ds.checkpoint.gather.willneed`),
which costs no memory of the process: the pages land in the page cache.

Memory stays bounded: a tensor counts against the budget from the moment its gathering starts
until its file is written, and a tensor waits until the ones in flight leave room for it. With
the budget at the largest tensor's size (the default callers use), the largest tensor is gathered
and written alone, exactly as in a sequential loop, and smaller ones overlap -- the peak is the
sequential loop's peak (the performance issue bounds it at 1.25x the largest tensor).

Per-record CRC32 is off by default (``crc32=False``): ``torch.load`` never checks it, every
file's sha256 goes into the checkpoint's manifest anyway (``--verify`` checks those), and it is
the writer thread's largest CPU cost after the write itself (about 0.3 s per GB here). Python's
``zipfile`` reports such records as corrupt, which is the one thing lost.

Files are written in submission order by one thread, so the on-disk sequence (and every named
fault point, which ``after`` callbacks run right after their file) is the sequential loop's.
An exception in the writer thread is raised in the caller at its next call, or at :meth:`close`.

Example::

    with PipelinedWriter(budget_bytes=largest, after=hasher.add) as writer:
        for name in names:
            writer.save(folder / f"{name}.pt", lambda: {"param": gather(name)}, nbytes=size(name),
                        prefetch=lambda: willneed(pieces(name)))
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch


@contextmanager
def _crc32(on: bool) -> Iterator[None]:
    """``torch.save``'s per-record CRC32 on or off for one save (restored after)."""
    was = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(on)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(was)


class _Ring:
    """Buffers for tensors in flight, carved from one reused arena in FIFO order.

    Why: a fresh multi-megabyte ``torch.empty`` per tensor is a fresh anonymous mapping whose
    every page the kernel must fault in and zero -- measured here, 8.4 GB of fresh 84 MB buffers
    cost 3.4 s of wall and 4.6 s of system time, reusing one buffer 0.5 s. The writer releases
    buffers in the order it got them, so a ring suffices: allocate after the newest buffer, or
    wrap to the start when the oldest has left room there. Each buffer is a tensor with *its own*
    storage of exactly its size (``torch.frombuffer``): ``torch.save`` writes a tensor's whole
    storage, so a plain view into the arena would write the arena."""

    _ALIGN = 64

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._arena: np.ndarray | None = None  # allocated on first use
        self._live: deque[tuple[int, int]] = deque()  # (start, size), oldest first

    def take(self, nbytes: int) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """A float32 buffer of ``nbytes`` and its ticket, or None if there is no room now."""
        size = -(-nbytes // self._ALIGN) * self._ALIGN
        if size > self.capacity:
            raise ValueError(f"buffer of {nbytes} bytes > ring of {self.capacity}")
        if not self._live:
            start = 0
        else:
            head = self._live[-1][0] + self._live[-1][1]
            tail = self._live[0][0]
            if head > tail:
                start = head if head + size <= self.capacity else (0 if size <= tail else None)
            else:  # wrapped: free space is [head, tail)
                start = head if head + size <= tail else None
            if start is None:
                return None
        if self._arena is None:
            self._arena = np.empty(self.capacity, dtype=np.uint8)
        ticket = (start, size)
        self._live.append(ticket)
        return torch.frombuffer(self._arena, dtype=torch.float32, count=nbytes // 4, offset=start), ticket

    def give_back(self, ticket: tuple[int, int]) -> None:
        if self._live and self._live[0] == ticket:
            self._live.popleft()
        else:  # not expected (the writer is FIFO); stay correct anyway
            self._live.remove(ticket)


class PipelinedWriter:
    """One writer thread; tensors gathered but not yet written live in a reused ring buffer."""

    def __init__(self, *, budget_bytes: int, save: Callable[[Any, Path], None] = torch.save,
                 after: Callable[[Path], None] | None = None, crc32: bool = False) -> None:
        self.budget = max(int(budget_bytes), 64)
        self._ring = _Ring(-(-self.budget // _Ring._ALIGN) * _Ring._ALIGN)
        self._save = save
        self._crc32 = crc32
        self._after = after
        self._room = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lag_ds-write")
        self._futures: list[Future[None]] = []

    def save(self, path: Path, make: Callable[[torch.Tensor | None], Any], *, nbytes: int = 0,
             prefetch: Callable[[], None] | None = None,
             after: Callable[[Path], None] | None = None) -> None:
        """``torch.save(make(buffer), path)`` in the writer thread. ``make`` runs here, once the
        tensors in flight leave room for ``nbytes``; ``buffer`` is a float32 tensor of
        ``nbytes // 4`` elements to gather into (its contents are undefined), or None for
        ``nbytes == 0`` -- ``make`` may also ignore it and return fresh tensors. ``after(path)``
        runs in the writer thread once the file is written and closed (the writer's, then
        this call's)."""
        self._raise_failed()
        if prefetch is not None:
            prefetch()
        buffer, ticket = None, None
        if nbytes > 0:
            with self._room:
                while (got := self._ring.take(int(nbytes))) is None and not self._failed():
                    self._room.wait(timeout=1.0)
            self._raise_failed()
            assert got is not None
            buffer, ticket = got
        try:
            obj = make(buffer)
        except BaseException:
            self._release(ticket)
            raise
        del buffer
        self._futures.append(self._pool.submit(self._write, obj, Path(path), ticket, after))

    def _write(self, obj: Any, path: Path, ticket: tuple[int, int] | None,
               after: Callable[[Path], None] | None) -> None:
        try:
            with _crc32(self._crc32):
                self._save(obj, path)
            del obj
            for callback in (self._after, after):
                if callback is not None:
                    callback(path)
        finally:
            self._release(ticket)

    def _release(self, ticket: tuple[int, int] | None) -> None:
        if ticket is None:
            return
        with self._room:
            self._ring.give_back(ticket)
            self._room.notify_all()

    def _failed(self) -> bool:
        return any(f.done() and f.exception() is not None for f in self._futures)

    def _raise_failed(self) -> None:
        done = [f for f in self._futures if f.done()]
        for future in done:
            future.result()  # re-raises the writer's exception here
        self._futures = [f for f in self._futures if not f.done()]

    def close(self) -> None:
        """Wait for every file; raise the first writer exception, if any."""
        try:
            for future in self._futures:
                future.result()
        finally:
            self._futures = []
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PipelinedWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: stop the queue, keep the caller's exception
            self._pool.shutdown(wait=True, cancel_futures=True)
