"""A real two-node SLURM cluster on one Linux box, for tests (root, Debian's ``slurm-wlm``).

Wraps ``tests/slurm_cluster.sh``, a copy of the project's verified recipe
(``shared/recipes/slurm_cluster.sh``; see its header and the design notes): munged, slurmctld in
the root namespace, and one slurmd per node, the nodes being network namespaces ``slurmn1`` /
``slurmn2`` (10.78.0.1/.2) on bridge ``slurmbr0`` with their own hostname and ``/etc/hosts``.
All nodes share the box's filesystem, so the venv and run directories are visible everywhere.

What this module adds to the recipe: one user at a time (an exclusive lock), leftovers of a
crashed run removed first (processes still inside the namespaces are killed before ``down``),
teardown whatever happens, :class:`Unavailable` (-> skip, with the reason) when the box cannot
host it (not Linux, not root, tools missing, ``slurm-wlm`` not installable), and helpers to
submit batch jobs and to find and cancel job steps.

Only the addresses of these namespaces are used.  Example::

    >>> with slurm_cluster() as cluster:                            # doctest: +SKIP
    ...     out = cluster.sbatch_wait(["-N2", "--ntasks-per-node=1"], "env | grep SLURM_")
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RECIPE = Path(__file__).resolve().with_name("slurm_cluster.sh")
STATE_DIR = Path("/run/lag_ds_slurm")
LOCK_PATH = Path("/run/lag_ds_slurm.lock")
NODES = ("slurmn1", "slurmn2")
IFNAME = "eth0"
TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


class Unavailable(RuntimeError):
    """The box cannot host the cluster: skip, with this reason."""


def tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(TOOL_DIRS))


def check_prerequisites() -> None:
    if not sys.platform.startswith("linux"):
        raise Unavailable(f"network namespaces need Linux, this is {sys.platform}")
    if os.geteuid() != 0:
        raise Unavailable("the SLURM daemons and network namespaces need root")
    for name in ("ip", "nsenter", "unshare", "bash"):
        if tool(name) is None:
            raise Unavailable(f"{name} not found")
    if not all(tool(n) for n in ("slurmctld", "slurmd", "munged", "sbatch")):
        # the recipe installs it; .ci/run does so up front
        if tool("apt-get") is None:
            raise Unavailable("slurm-wlm is not installed and there is no apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        proc = subprocess.run([tool("apt-get"), "install", "-y", "-qq", "slurm-wlm"], env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise Unavailable(f"slurm-wlm is not installable here: {proc.stderr.strip()[-300:]}")


def _recipe(command: str, *, check: bool = True, timeout: float = 180) -> str:
    env = {**os.environ, "SLURM_CLUSTER_DIR": str(STATE_DIR)}
    proc = subprocess.run(["bash", str(RECIPE), command], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"slurm_cluster.sh {command} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def _namespace_pids(ns: str) -> list[int]:
    proc = subprocess.run([tool("ip"), "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def teardown() -> None:
    """Kill whatever runs inside the node namespaces, then the recipe's ``down``."""
    if os.geteuid() != 0 or tool("ip") is None:
        return
    listed = subprocess.run([tool("ip"), "netns", "list"], capture_output=True, text=True).stdout
    # slurmd/slurmstepd first (the recipe stops slurmd by its pid file), then stray tasks
    for ns in NODES:
        if ns in listed.split():
            for pid in _namespace_pids(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    _recipe("down", check=False)


@dataclass(frozen=True)
class Cluster:
    conf: Path

    @property
    def env(self) -> dict[str, str]:
        """Our environment plus ``SLURM_CONF`` (every client needs it)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, timeout: float = 60, check: bool = True) -> str:
        proc = subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}")
        return proc.stdout

    def sbatch(self, options: Sequence[str], script: str, *, output: Path,
               env: dict[str, str] | None = None) -> int:
        """Submit ``script`` (shell text) with ``options``; returns the job id."""
        output.parent.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["sbatch", "--parsable", "-o", str(output), *options],
                             input="#!/bin/bash\n" + script, env={**self.env, **(env or {})},
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return int(out.strip().split(";")[0])

    def wait(self, job_id: int, *, timeout: float = 300) -> str:
        """Wait until the job left the queue; returns its final state (``scontrol``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-j", str(job_id), check=False).strip():
                break
            time.sleep(0.3)
        else:
            raise TimeoutError(f"SLURM job {job_id} still queued/running after {timeout:g}s")
        info = self.run("scontrol", "show", "job", str(job_id), check=False)
        state = [w for w in info.split() if w.startswith("JobState=")]
        return state[0].split("=", 1)[1] if state else "GONE"

    def steps(self) -> dict[str, str]:
        """Running job steps: step name -> ``JOBID.STEPID``."""
        out = self.run("squeue", "-s", "-h", "-o", "%i %j", check=False)
        return {name: step for step, name in (line.split(None, 1) for line in out.splitlines()
                                              if len(line.split(None, 1)) == 2)}


@contextmanager
def _exclusive_lock(timeout_s: float = 900.0) -> Iterator[None]:
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{LOCK_PATH} held by another run for {timeout_s:g}s")
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)


@contextmanager
def slurm_cluster() -> Iterator[Cluster]:
    """Bring the cluster up (after clearing leftovers), yield it, always tear it down."""
    check_prerequisites()
    with _exclusive_lock():
        teardown()
        atexit.register(teardown)
        try:
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            _recipe("up")
            yield Cluster(conf=STATE_DIR / "slurm.conf")
        finally:
            atexit.unregister(teardown)
            teardown()
