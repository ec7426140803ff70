"""DeepSpeed's JIT-built ops: build them once before any job starts, and never wait on a dead lock.

DeepSpeed JIT-loads its ops (on a CPU box ``deepspeed_shm_comm``, when ``deepspeed.comm`` starts)
through ``torch.utils.cpp_extension.load``, which guards each build directory with
``torch.utils.file_baton.FileBaton``: ``os.open(DIR/lock, O_CREAT | O_EXCL)``, the fd kept open
while ninja runs (with ``cwd=DIR``), ``os.remove`` when done.  *Every* process that loads the op
takes the lock, if only for the second ninja needs to find the build up to date.  A process
killed while holding it leaves the file behind, and every later loader spins in
``FileBaton.wait`` forever at 0 % CPU -- which a supervisor's own hang-kill can cause.

A lock is **stale** here when

* no live process has the file open (the owner holds its fd for the whole build; torch's fds
  are not inherited by children), and
* no live process has its working directory in the build directory (a killed owner's orphaned
  ``ninja``/``c++`` may still be writing there; removing the lock then would let a second build
  run over it), and
* the file belongs to us (or we are root): another user's processes' fds are not ours to read,
  so a lock another user took is never judged stale;
* the directory is on a local filesystem -- on a network filesystem (NFS home directories are
  common on clusters) the owner may be a process on another host, invisible in our ``/proc``,
  so there the file must also be older than ``min_age_network_s``.

A stale lock is moved aside atomically (rename, then check it is still the file judged stale)
and deleted, and every removal is reported.

Example::

    >>> ops = prepare_deepspeed_ops(timeout_s=900)              # doctest: +SKIP
    >>> ops.removed_locks                                        # doctest: +SKIP
    ('removed stale JIT-build lock /root/.cache/torch_extensions/py311_cpu/deepspeed_shm_comm/lock
      (no process holds it or builds there; created 05:44:51, 734 s ago)',)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lag_ds.toolchain import pin_ninja

NETWORK_FS_TYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
    "fuse.glusterfs", "fuse.sshfs", "fuse.beegfs", "afs", "orangefs", "panfs", "wekafs"})
DEFAULT_OPS = ("ShareMemCommBuilder",)
"""The op every DeepSpeed job JIT-loads on a CPU box (``deepspeed.comm``); other accelerators
report it as not used and skip it."""
_RESULT_MARK = "LAG_DS_OPS_RESULT "


def extension_root(env: Mapping[str, str] | None = None) -> Path:
    """torch's extension build root for a process with environment ``env`` (default: ours):
    ``TORCH_EXTENSIONS_DIR``, else ``$XDG_CACHE_HOME/torch_extensions`` or
    ``~/.cache/torch_extensions`` (``torch.utils.cpp_extension.get_default_build_root``)."""
    env = os.environ if env is None else env
    if env.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.path.realpath(env["TORCH_EXTENSIONS_DIR"]))
    cache = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or str(Path.home()), ".cache")
    return Path(os.path.realpath(os.path.join(cache, "torch_extensions")))


def find_build_locks(root: Path) -> list[Path]:
    """Lock files under ``root``: ``root/NAME/lock`` (with ``TORCH_EXTENSIONS_DIR``) and
    ``root/py311_cpu/NAME/lock`` (the default root)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(set(root.glob("*/lock")) | set(root.glob("*/*/lock")))


def _pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def _is_live(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _holders(path: Path, ino: tuple[int, int]) -> list[int]:
    """Live pids with an fd on the inode ``ino`` = (st_dev, st_ino), found in ``path``'s dir."""
    prefix = str(path.parent) + os.sep
    found = []
    for pid in _pids():
        try:
            fds = os.scandir(f"/proc/{pid}/fd")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        with fds:
            for fd in fds:
                try:
                    if not os.readlink(fd.path).startswith(prefix):
                        continue
                    st = os.stat(fd.path)
                except (FileNotFoundError, ProcessLookupError, PermissionError):
                    continue
                if (st.st_dev, st.st_ino) == ino and _is_live(pid):
                    found.append(pid)
                    break
    return found


def _builders(directory: Path) -> list[int]:
    """Live pids whose working directory is ``directory`` or below (ninja, c++)."""
    target = str(directory)
    found = []
    for pid in _pids():
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if (cwd == target or cwd.startswith(target + os.sep)) and _is_live(pid):
            found.append(pid)
    return found


def filesystem_type(path: Path) -> str:
    """Type of the filesystem holding ``path`` (longest mount point in /proc/self/mountinfo)."""
    target = os.path.realpath(path)
    best, fstype = "", "unknown"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mount_point = left.split()[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fstype = mount_point, right.split()[0]
    return fstype


def command_line(pid: int) -> str:
    """``pid``'s command line, shortened, for messages."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return "?"
    text = " ".join(a.decode(errors="replace") for a in argv if a)
    return text if len(text) <= 120 else text[:117] + "..."


@dataclass(frozen=True, kw_only=True)
class LockInfo:
    """What is known about one build lock file."""

    path: Path
    inode: tuple[int, int]
    """(st_dev, st_ino)"""
    mtime_ns: int
    """mtime of the (empty, never written) file: when it was taken; with the inode, it tells
    this file from a new lock that reuses the inode number."""
    holders: tuple[int, ...]
    """Live processes with the file open: the owner, when it is alive."""
    builders: tuple[int, ...]
    """Live processes working in the build directory (an orphaned ninja/c++)."""
    fs_type: str
    foreign: bool = False
    """Owned by another user while we are not root: its owner's fds are invisible to us."""
    foreign_uid: int = -1

    @property
    def network_fs(self) -> bool:
        return self.fs_type in NETWORK_FS_TYPES

    @property
    def created(self) -> float:
        return self.mtime_ns / 1e9

    @property
    def age_s(self) -> float:
        return time.time() - self.created

    def is_stale(self, *, min_age_network_s: float) -> bool:
        if self.holders or self.builders or self.foreign:
            return False
        return not self.network_fs or self.age_s >= min_age_network_s

    def describe(self) -> str:
        """One phrase: who holds it, or why it is stale."""
        when = time.strftime("%H:%M:%S", time.localtime(self.created))
        if self.holders:
            who = ", ".join(f"pid {p} ({command_line(p)})" for p in self.holders)
            return f"held by {who} since {when}"
        if self.foreign:
            return f"taken by another user (uid {self.foreign_uid}) since {when}; not ours to judge"
        if self.builders:
            return (f"owner gone, but pids {list(self.builders)} still build in "
                    f"{self.path.parent}")
        where = f" on {self.fs_type}" if self.network_fs else ""
        return (f"no process holds it or builds there{where}; created {when}, "
                f"{self.age_s:.0f} s ago")


def inspect_lock(path: Path) -> LockInfo | None:
    """A :class:`LockInfo` for ``path``, or None when there is no such file (any more)."""
    path = Path(os.path.realpath(path))
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    ino = (st.st_dev, st.st_ino)
    foreign = st.st_uid != os.geteuid() and os.geteuid() != 0
    return LockInfo(path=path, inode=ino, mtime_ns=st.st_mtime_ns, foreign=foreign,
                    foreign_uid=st.st_uid, holders=tuple(_holders(path, ino)),
                    builders=tuple(_builders(path.parent)), fs_type=filesystem_type(path))


def _remove_if_same(info: LockInfo) -> bool:
    """Move the lock aside, delete it if it is still the inode judged stale; else put it back."""
    aside = info.path.with_name(f"{info.path.name}.stale.{os.getpid()}")
    try:
        os.rename(info.path, aside)
    except FileNotFoundError:
        return False  # released meanwhile
    st = aside.stat()
    if ((st.st_dev, st.st_ino), st.st_mtime_ns) != (info.inode, info.mtime_ns):  # a new owner took it between our look and rename
        try:
            os.link(aside, info.path)
        except FileExistsError:
            pass
        aside.unlink()
        return False
    aside.unlink()
    return True


def clear_stale_locks(root: Path, *, min_age_network_s: float = 600.0) -> list[str]:
    """Remove every stale build lock under ``root`` (see the module docstring); one message per
    removed lock."""
    messages = []
    for path in find_build_locks(root):
        info = inspect_lock(path)
        if info is None or not info.is_stale(min_age_network_s=min_age_network_s):
            continue
        if _remove_if_same(info):
            messages.append(f"removed stale JIT-build lock {info.path} ({info.describe()})")
    return messages


def describe_locks(root: Path) -> list[str]:
    """``PATH: who holds it`` for every lock under ``root`` (for error messages)."""
    out = []
    for path in find_build_locks(root):
        info = inspect_lock(path)
        if info is not None:
            out.append(f"{info.path}: {info.describe()}")
    return out


_SCRIPT = r"""
import json, sys, time
t0 = time.time()
import deepspeed.ops
from deepspeed.accelerator import get_accelerator
acc = get_accelerator()
ops = {}
for name in sys.argv[1:]:
    builder = acc.create_op_builder(name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        ops[name] = "not used with this accelerator"
        continue
    t = time.time()
    builder.load(verbose=False)
    ops[name] = f"loaded in {time.time() - t:.1f} s"
print("%s" + json.dumps({"accelerator": acc.device_name(), "ops": ops}), flush=True)
"""


@dataclass(frozen=True, kw_only=True)
class PreparedOps:
    """What :func:`prepare_deepspeed_ops` did."""

    build_root: Path
    accelerator: str
    ops: Mapping[str, str]
    """Builder name -> ``loaded in N s`` or why it was skipped."""
    removed_locks: tuple[str, ...]
    seconds: float


def prepare_deepspeed_ops(*, env: Mapping[str, str] | None = None, timeout_s: float = 900.0,
                          ops: Sequence[str] = DEFAULT_OPS, min_age_network_s: float = 600.0,
                          poll_s: float = 0.5,
                          log: Callable[[str], None] | None = None) -> PreparedOps:
    """Build/load DeepSpeed's JIT ops once, in a subprocess, before any job starts.

    Stale build locks under the extension root of ``env`` (default: ours) are removed first and
    again while waiting (an owner may die meanwhile); each removal is passed to ``log`` (default:
    stderr) and returned.  On failure, or after ``timeout_s``, the subprocess group is killed and
    ``RuntimeError`` says why: its output, or which lock it waited on and who holds it.
    """
    if not timeout_s > 0:
        raise ValueError(f"prepare_deepspeed_ops: timeout_s must be > 0, got {timeout_s}")
    if log is None:
        def log(message: str) -> None:
            print(f"lag_ds.launch: {message}", file=sys.stderr, flush=True)
    env = dict(os.environ if env is None else env)
    pin_ninja(env)  # the ninja the jobs will use (lag_ds/toolchain.py: two ninjas rebuild)
    root = extension_root(env)
    removed: list[str] = []

    def sweep() -> None:
        for message in clear_stale_locks(root, min_age_network_s=min_age_network_s):
            removed.append(message)
            log(message)

    t0 = time.monotonic()
    sweep()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-c", _SCRIPT % _RESULT_MARK, *ops], env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        last_sweep = time.monotonic()
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now - t0 > timeout_s:
                    locks = describe_locks(root)
                    waited = ("; waiting on " + "; ".join(locks)) if locks else ""
                    raise RuntimeError(
                        f"prepare_deepspeed_ops: building/loading DeepSpeed ops {list(ops)} in "
                        f"{root} did not finish in {timeout_s:g} s{waited}")
                if now - last_sweep >= 2.0:
                    sweep()
                    last_sweep = now
                time.sleep(poll_s)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                time.sleep(0.1)
                sweep()  # our own kill may have left the lock
        out.seek(0)
        text = out.read()
    result = next((line[len(_RESULT_MARK):] for line in text.splitlines()
                   if line.startswith(_RESULT_MARK)), None)
    if proc.returncode != 0 or result is None:
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise RuntimeError(f"prepare_deepspeed_ops: building/loading DeepSpeed ops {list(ops)} "
                           f"failed (exit code {proc.returncode}):\n{tail}")
    parsed = json.loads(result)
    return PreparedOps(build_root=root, accelerator=parsed["accelerator"], ops=parsed["ops"],
                       removed_locks=tuple(removed), seconds=time.monotonic() - t0)
