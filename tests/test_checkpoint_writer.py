"""The pipelined tensor writer: order, bounded buffers, failures, and hashing on the way out.

``lag_ds/checkpoint/writer.py`` lets a grow gather tensor N+1 while tensor N is saved; what must
not change is what the sequential loop guaranteed: files in submission order, no more than the
budget in flight, the first error raised in the caller, and (``BackgroundHasher.save``) a sha256
equal to the file's.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest
import torch

from lag_ds.checkpoint.manifest import BackgroundHasher
from lag_ds.checkpoint.writer import PipelinedWriter, _Ring


def test_ring_reuses_memory_fifo_and_never_overlaps():
    ring = _Ring(1024)
    a, ta = ring.take(400)  # sizes round up to 64 bytes: 448
    b, tb = ring.take(400)
    assert ring.take(400) is None  # 896 used, 128 free at the end, nothing at the start yet
    ring.give_back(ta)
    c, tc = ring.take(384)  # wraps to the start, into a's old place
    assert tc[0] == 0 and a.data_ptr() == c.data_ptr()
    spans = sorted([(tb[0], tb[0] + tb[1]), (tc[0], tc[0] + tc[1])])
    assert spans[0][1] <= spans[1][0]
    assert ring.take(128) is None  # only [384, 448) is free before b (at 448): too small
    ring.give_back(tb)
    ring.give_back(tc)
    d, td = ring.take(1024)  # empty again: the whole arena
    assert td == (0, 1024)
    # each buffer owns a storage of exactly its size: torch.save must not write the arena
    assert d.untyped_storage().nbytes() == 1024 and b.untyped_storage().nbytes() == 400


def test_writer_keeps_order_and_budget(tmp_path):
    order: list[str] = []
    in_flight, peak, lock = [0], [0], threading.Lock()
    size = 4096 * 4

    def slow_save(obj, path):
        time.sleep(0.02)
        torch.save(obj, path)

    def make(i):
        def fill(out):
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            return {"param": out.fill_(float(i)).view(64, 64)}
        return fill

    def done(path):
        order.append(path.name)
        with lock:
            in_flight[0] -= 1

    with PipelinedWriter(budget_bytes=2 * size, save=slow_save, after=done) as writer:
        for i in range(12):
            writer.save(tmp_path / f"{i:02d}.pt", make(i), nbytes=size)
    assert order == [f"{i:02d}.pt" for i in range(12)]
    assert peak[0] == 2  # it did overlap, and never beyond the budget (2 tensors)
    for i in range(12):  # the ring reused memory, yet every file holds its own tensor
        t = torch.load(tmp_path / f"{i:02d}.pt", weights_only=True)["param"]
        assert t.shape == (64, 64) and bool((t == i).all())
        assert (tmp_path / f"{i:02d}.pt").stat().st_size < 2 * size  # not the whole arena


def test_writer_raises_the_first_failure_and_stops(tmp_path):
    saved: list[str] = []

    def failing_save(obj, path):
        if path.name == "03.pt":
            raise OSError(28, "No space left on device")
        torch.save(obj, path)
        saved.append(path.name)

    with pytest.raises(OSError, match="No space left"):
        with PipelinedWriter(budget_bytes=1 << 20, save=failing_save) as writer:
            for i in range(50):
                writer.save(tmp_path / f"{i:02d}.pt", lambda out: {"param": out.zero_()}, nbytes=1024)
                time.sleep(0.005)
    assert "02.pt" in saved and len(saved) < 49  # it stopped soon after the failure


def test_make_failure_releases_its_buffer(tmp_path):
    with PipelinedWriter(budget_bytes=1024) as writer:
        with pytest.raises(RuntimeError, match="gather failed"):
            writer.save(tmp_path / "a.pt", lambda out: (_ for _ in ()).throw(RuntimeError("gather failed")),
                        nbytes=1024)
        writer.save(tmp_path / "b.pt", lambda out: {"param": out.zero_()}, nbytes=1024)  # no deadlock
    assert (tmp_path / "b.pt").is_file() and not (tmp_path / "a.pt").exists()


def test_hashing_save_matches_the_file_and_loads(tmp_path):
    big = torch.arange(3 << 20, dtype=torch.float32)  # 12 MiB: hashed in the second thread
    with BackgroundHasher() as hasher:
        hasher.save({"param": big, "cat_dim": 0}, tmp_path / "big.pt")
        hasher.save(torch.tensor(7.0), tmp_path / "small.pt")
        digests = hasher.results()
    for name in ("big.pt", "small.pt"):
        path = tmp_path / name
        assert digests[path] == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = torch.load(tmp_path / "big.pt", weights_only=True, mmap=True)
    assert torch.equal(loaded["param"], big) and loaded["cat_dim"] == 0


def test_crc32_off_only_inside_the_writer(tmp_path):
    import zipfile

    before = torch.serialization.get_crc32_options()
    with PipelinedWriter(budget_bytes=1 << 16) as writer:
        writer.save(tmp_path / "a.pt", lambda out: {"param": out.fill_(1.0)}, nbytes=1 << 16)
    assert torch.serialization.get_crc32_options() == before
    info = [i for i in zipfile.ZipFile(tmp_path / "a.pt").infolist() if i.filename.endswith("/0")]
    assert info and info[0].CRC == 0  # torch.load does not check it; the manifest's sha256 does
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["param"],
                       torch.ones(1 << 14))


def test_prefetch_runs_before_the_gather(tmp_path):
    events: list[str] = []
    with PipelinedWriter(budget_bytes=64) as writer:
        writer.save(Path(tmp_path / "a.pt"), lambda out: events.append("make") or {"x": 1},
                    nbytes=64, prefetch=lambda: events.append("prefetch"))
    assert events == ["prefetch", "make"]
