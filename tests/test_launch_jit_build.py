"""Stale JIT-build locks: what makes one stale, removing it, and building DeepSpeed's ops first.

The lock files are real torch ``FileBaton`` locks taken by real processes (killed to make them
stale); ``prepare_deepspeed_ops`` really builds/loads DeepSpeed's comm op in a private
``TORCH_EXTENSIONS_DIR`` (seeded from the shared build cache when there is one, so ninja finds
the build up to date and it takes seconds, not a minute).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fake_trainer as ft
import pytest

from lag_ds.launch.jit_build import (
    LockInfo,
    _remove_if_same,
    clear_stale_locks,
    describe_locks,
    extension_root,
    filesystem_type,
    find_build_locks,
    inspect_lock,
    prepare_deepspeed_ops,
)

HOLDER = """
import sys, time
sys.path.insert(0, {tests!r})
import fake_trainer
baton = fake_trainer.file_baton_class()({lock!r})
assert baton.try_acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_lock(lock: Path, *, cwd: Path | None = None) -> subprocess.Popen:
    """A live process holding ``lock`` exactly as torch's ``_jit_compile`` does."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(tests=str(ft.HERE.parent),
                                                                 lock=str(lock))],
                            stdout=subprocess.PIPE, text=True, cwd=cwd)
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_extension_root_follows_torch():
    assert extension_root({"TORCH_EXTENSIONS_DIR": "/x/ext", "HOME": "/h"}) == Path("/x/ext")
    assert extension_root({"XDG_CACHE_HOME": "/c", "HOME": "/h"}) == Path("/c/torch_extensions")
    assert extension_root({"HOME": "/h"}) == Path("/h/.cache/torch_extensions")
    # the same rule as torch's own
    from torch.utils.cpp_extension import get_default_build_root
    assert extension_root() == Path(os.path.realpath(get_default_build_root()))


def test_lock_of_a_killed_owner_is_stale_and_removed(tmp_path):
    root = tmp_path / "ext"
    lock = root / "py311_cpu" / "op" / "lock"
    owner = hold_lock(lock)
    try:
        info = inspect_lock(lock)
        assert info.holders == (owner.pid,) and not info.is_stale(min_age_network_s=0)
        assert clear_stale_locks(root) == []  # a live owner's lock is never touched
        assert f"held by pid {owner.pid}" in describe_locks(root)[0]
    finally:
        kill(owner)
    assert find_build_locks(root) == [lock]
    info = inspect_lock(lock)
    assert info.holders == () and info.builders == () and info.is_stale(min_age_network_s=600)
    (message,) = clear_stale_locks(root)
    assert message.startswith(f"removed stale JIT-build lock {lock} (no process holds it")
    assert not lock.exists() and list(lock.parent.iterdir()) == []  # nothing left aside


def test_orphaned_compiler_in_the_build_dir_keeps_the_lock(tmp_path):
    lock = tmp_path / "ext" / "op" / "lock"
    owner = hold_lock(lock)
    kill(owner)
    # the killed owner's ninja/c++ would still be running with cwd = the build directory
    orphan = subprocess.Popen(["sleep", "60"], cwd=lock.parent)
    try:
        info = inspect_lock(lock)
        assert info.builders == (orphan.pid,) and not info.is_stale(min_age_network_s=0)
        assert "still build in" in info.describe()
        assert clear_stale_locks(tmp_path / "ext") == [] and lock.exists()
    finally:
        kill(orphan)
    assert len(clear_stale_locks(tmp_path / "ext")) == 1


def test_network_filesystem_needs_an_old_lock(tmp_path):
    def info(fs_type, age):
        return LockInfo(path=tmp_path / "lock", inode=(0, 0),
                        mtime_ns=int((time.time() - age) * 1e9),
                        holders=(), builders=(), fs_type=fs_type)

    # the owner may be on another host: only an old lock counts as stale there
    assert not info("nfs4", 10).is_stale(min_age_network_s=600)
    assert info("nfs4", 700).is_stale(min_age_network_s=600)
    assert info("ext4", 0).is_stale(min_age_network_s=600)
    assert "on nfs4" in info("nfs4", 700).describe()
    foreign = LockInfo(path=tmp_path / "lock", inode=(0, 0), mtime_ns=0, holders=(), builders=(),
                       fs_type="ext4", foreign=True, foreign_uid=1234)
    assert not foreign.is_stale(min_age_network_s=0) and "uid 1234" in foreign.describe()
    assert filesystem_type(Path("/proc/self")) == "proc"


def test_a_lock_retaken_meanwhile_is_put_back(tmp_path):
    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    lock.touch()
    judged = inspect_lock(lock)
    lock.unlink()  # released, and taken again by a new owner, between our look and the removal
    time.sleep(0.01)
    lock.touch()
    assert not _remove_if_same(judged)
    assert lock.exists() and sorted(p.name for p in lock.parent.iterdir()) == ["lock"]
    assert _remove_if_same(inspect_lock(lock)) and not lock.exists()


TEST_CACHE = Path.home() / ".cache" / "lag_ds_tests" / "torch_extensions"
"""The tests' own build cache: built once (~60 s), never the cache real jobs use."""


@pytest.fixture(scope="session")
def built_ops() -> Path:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(TEST_CACHE)}
    prepare_deepspeed_ops(env=env, timeout_s=900, log=lambda m: None)
    return TEST_CACHE


def _private_ext_dir(tmp_path: Path, built: Path) -> Path:
    """A TORCH_EXTENSIONS_DIR holding a copy of a finished build (mtimes and ninja log kept, so
    ninja finds it up to date)."""
    ext = tmp_path / "ext"
    shutil.copytree(built, ext, ignore=shutil.ignore_patterns("lock", "lock.stale.*"))
    return ext


@pytest.mark.slow
def test_prepare_deepspeed_ops_clears_a_stale_lock_and_loads(tmp_path, built_ops):
    ext = _private_ext_dir(tmp_path, built_ops)
    lock = ext / "deepspeed_shm_comm" / "lock"
    kill(hold_lock(lock))  # a loader killed while holding the lock: later loaders would hang
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    logged = []
    ops = prepare_deepspeed_ops(env=env, timeout_s=600, log=logged.append)
    assert ops.build_root == ext and ops.accelerator == "cpu"
    assert ops.ops["ShareMemCommBuilder"].startswith("loaded in")
    assert logged == list(ops.removed_locks) and len(logged) == 1
    assert f"removed stale JIT-build lock {lock}" in logged[0]
    assert not lock.exists() and (ext / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists()
    assert ops.seconds < 60  # loaded from the copied build, not rebuilt


@pytest.mark.slow
def test_prepare_deepspeed_ops_names_a_live_holder_on_timeout(tmp_path, built_ops):
    ext = _private_ext_dir(tmp_path, built_ops)
    lock = ext / "deepspeed_shm_comm" / "lock"
    owner = hold_lock(lock)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    try:
        with pytest.raises(RuntimeError) as err:
            prepare_deepspeed_ops(env=env, timeout_s=8, log=lambda m: None)
        text = str(err.value)
        assert "did not finish in 8 s; waiting on" in text
        assert f"{lock}: held by pid {owner.pid}" in text
        assert lock.exists()  # a live owner's lock is left alone
    finally:
        kill(owner)
