"""Job specs and the exact command that starts one job on one slice.

A job is a command + environment + run directory; nothing here knows what the script trains.
Three launchers:

* ``"deepspeed"`` -- the real DeepSpeed runner (``deepspeed`` is ``python -m
  deepspeed.launcher.runner``; we call it through ``sys.executable`` so the job uses the same
  interpreter and venv as the orchestrator, whatever ``PATH`` says).  For a *local* slice we
  call what the runner itself would exec for it, DeepSpeed's per-node launcher ``python -m
  deepspeed.launcher.launch --world_info=B64 --master_addr=127.0.0.1 --master_port=P``, with
  the ``world_info`` the runner would encode (``{"localhost": [slots]}``): the ranks get the
  same environment, and each job saves one Python process importing deepspeed (4-5 s on this
  box, for a candidate that may train only a few dozen steps).
* ``"direct"`` -- ``python script args`` for a one-slot local slice with the rank variables the
  DeepSpeed launcher would set; unit tests use it to exercise supervision in milliseconds.
* ``"srun"`` -- inside a SLURM allocation (``sbatch -N2 ...``), each job is a job step: ``srun
  --overlap --nodelist=HOSTS --nodes=N --ntasks=T --ntasks-per-node=K python -u script args``.
  No ssh/pdsh between nodes is needed (many clusters have none).  ``--overlap`` because the
  launcher itself tiles the allocation into slices: without it a step asks for whole nodes'
  CPUs (and, with ``CR_*_Memory``, all the job's memory) and concurrent steps queue behind each
  other.  A tiny ``sh`` shim per task sets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` from
  ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_STEP_NUM_TASKS`` (what DeepSpeed's own launcher would
  set, so the trainer needs no SLURM code) and, for a slice that is part of a node, narrows
  ``CUDA_VISIBLE_DEVICES`` to the slice's slots.  ``MASTER_ADDR`` is the slice's first node
  name; ``LOCAL_SIZE`` its ranks per node (DeepSpeed's CPU shm all-reduce needs it).
  ``--kill-on-bad-exit=1``: one dead rank ends the step instead of leaving the others waiting
  in a collective.  Steps are named after the job (``squeue -s``, ``scancel JOB.STEP``).

What the DeepSpeed 0.19.8 runner needs, found by reading ``launcher/runner.py`` and trying it on a
CPU box (see the launch tests):

* Local slice: no hostfile.  The runner then sizes ``localhost`` by the accelerator's device count,
  and DeepSpeed's CPU accelerator reports the number of NUMA nodes (1 here) unless ``LOCAL_SIZE``
  is set, so ``--include localhost:0,1`` fails with "No slot '1' specified on host 'localhost'".
  We set ``LOCAL_SIZE`` = highest slot + 1 in the runner's environment (the launcher overwrites it
  for the ranks; GPU accelerators ignore it).
* Multi-host (or remote single-host) slice: ``--hostfile`` (the allocation), ``--include``,
  ``--master_addr`` = first host of the slice (otherwise the runner ssh-es ``hostname -I``), and
  ``--force_multi`` for a single remote host (otherwise the runner starts the ranks *here*).
  The pdsh backend forwards only ``PYTHON*``/``MLFLOW*``/``UCX*``/``MV2*``/``NCCL*`` variables and
  ``.deepspeed_env`` lines -- and more than one ``.deepspeed_env`` line yields a broken remote
  shell command (``export A=1\\n; export B=2``) -- so the job's own environment (e.g.
  ``GLOO_SOCKET_IFNAME``) travels as a sourced script via ``--venv_script``.  The run directory
  must be on a filesystem all hosts share (it already must be, for checkpoints).

Example::

    >>> from lag_ds.launch.allocation import Allocation
    >>> job = JobSpec(name="c0", script="train.py", args=["--k", "200"], run_dir="runs/c0")
    >>> argv = build_command(job, Allocation.local(2).split(1)[1], master_port=29501)
    >>> argv[3:5]
    ['deepspeed.launcher.launch', '--world_info=eyJsb2NhbGhvc3QiOiBbMV19']
    >>> argv[5:]
    ['--master_addr=127.0.0.1', '--master_port=29501', 'train.py', '--k', '200']
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import socket
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lag_ds.launch.allocation import Slice
from lag_ds.launch.diagnose import STACK_DUMP_DIR_ENV

Launcher = Literal["deepspeed", "direct", "srun"]
LAUNCHERS: tuple[str, ...] = ("deepspeed", "direct", "srun")
SRUN = "srun"
# $1.. = the command.  Runs once per task of the step.
_SRUN_SHIM = ('export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" '
              'WORLD_SIZE="${SLURM_STEP_NUM_TASKS:-$SLURM_NTASKS}"; '
              'if [ -n "$LAG_DS_SLOTS" ] && [ -n "$CUDA_VISIBLE_DEVICES" ]; then '
              'CUDA_VISIBLE_DEVICES=$(echo "$CUDA_VISIBLE_DEVICES" | awk -F, -v s="$LAG_DS_SLOTS" '
              "'{n = split(s, a, \",\"); o = \"\"; "
              "for (i = 1; i <= n; i++) o = o (i > 1 ? \",\" : \"\") $(a[i] + 1); print o}'); "
              'export CUDA_VISIBLE_DEVICES; fi; exec "$@"')
_SRUN_SHIM_NAME = "lag-rank"
DEEPSPEED_RUNNER: tuple[str, ...] = (sys.executable, "-u", "-m", "deepspeed.launcher.runner")
DEEPSPEED_LAUNCH: tuple[str, ...] = (sys.executable, "-u", "-m", "deepspeed.launcher.launch")
DEFAULT_BASE_PORT = 29500  # DeepSpeed's own default master port
# Set by the launcher for each rank; a job must not override them.
RESERVED_ENV = frozenset({"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                          "MASTER_PORT", "CUDA_VISIBLE_DEVICES"})


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One candidate run: ``script args`` in ``run_dir`` with extra ``env``."""

    name: str
    """Candidate name; unique within one ``run_jobs`` call (the journal is keyed by it)."""
    script: str
    """Path of the training script, or a module name when ``module`` is true."""
    args: Sequence[str] = ()
    """Arguments after the script."""
    run_dir: Path
    """Where the job writes ``metrics.jsonl``; the launcher adds ``launcher.log``,
    ``launcher.pid`` and ``launcher.exit`` there."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Variables added to the orchestrator's environment (forwarded to remote hosts too)."""
    module: bool = False
    """Run ``script`` as ``python -m script``."""
    total_steps: int | None = None
    """The step the job ends at, if it has one: the progress display shows "step/total" and
    an ETA from the job's measured speed."""
    status_prefix: str | None = None
    """Lines of the job's output starting with this prefix are status lines ("preparing
    data ..."); the progress display shows the newest one until the job logs its first step."""

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "._-" for c in self.name):
            raise ValueError(f"JobSpec: name must be non-empty [A-Za-z0-9._-], got {self.name!r}")
        object.__setattr__(self, "args", tuple(str(a) for a in self.args))
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        object.__setattr__(self, "env", dict(self.env))
        if not self.script:
            raise ValueError(f"JobSpec {self.name!r}: empty script")
        clash = sorted(RESERVED_ENV & set(self.env))
        if clash:
            raise ValueError(f"JobSpec {self.name!r}: env sets launcher-owned variables {clash}")
        bad = [k for k in self.env if not k.isidentifier()]
        if bad:
            raise ValueError(f"JobSpec {self.name!r}: env names must be identifiers, got {bad}")

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "launcher.log"

    @property
    def exit_path(self) -> Path:
        """Written by the exit-status wrapper when the command ends (see ``process.py``)."""
        return self.run_dir / "launcher.exit"

    @property
    def pid_path(self) -> Path:
        """Pid of the job's wrapper, written by the wrapper itself (see ``process.py``)."""
        return self.run_dir / "launcher.pid"

    @property
    def remote_env_path(self) -> Path:
        """Script sourced on every host of a multi-host launch (``--venv_script``)."""
        return self.run_dir / "launcher_env.sh"


def _python_target(job: JobSpec) -> list[str]:
    return (["-m"] if job.module else []) + [job.script, *job.args]


def _srun_tasks_per_node(slice_: Slice) -> int:
    counts = {len(slots) for _, slots in slice_.parts}
    if slice_.is_local or len(counts) != 1:
        raise ValueError(f"build_command: launcher 'srun' needs SLURM node names and the same "
                         f"number of slots on each node, got slice {slice_.include!r}")
    return counts.pop()


def srun_command(job: JobSpec, slice_: Slice) -> list[str]:
    """The job as one SLURM job step on ``slice_``'s nodes (see the module docstring)."""
    per_node = _srun_tasks_per_node(slice_)
    return [SRUN, "--overlap", f"--job-name={job.name}", f"--nodes={len(slice_.hosts)}",
            f"--ntasks={slice_.num_slots}", f"--ntasks-per-node={per_node}",
            f"--nodelist={','.join(slice_.hosts)}", "--kill-on-bad-exit=1", "--export=ALL",
            "/bin/sh", "-c", _SRUN_SHIM, _SRUN_SHIM_NAME, sys.executable, "-u",
            *_python_target(job)]


def build_command(job: JobSpec, slice_: Slice, *, master_port: int,
                  hostfile_path: str | Path | None = None, launcher: Launcher = "deepspeed",
                  ssh_check: bool = True) -> list[str]:
    """The argv that starts ``job`` on ``slice_`` (see the module docstring for why each flag)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"build_command: launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if not 0 < master_port < 65536:
        raise ValueError(f"build_command: master_port out of range: {master_port}")
    if launcher == "direct":
        if not slice_.is_local or slice_.num_slots != 1:
            raise ValueError(f"build_command: launcher 'direct' runs one local slot, "
                             f"got slice {slice_.include!r}")
        return [sys.executable, "-u", *_python_target(job)]
    if launcher == "srun":
        return srun_command(job, slice_)

    if slice_.is_local:  # what the runner would exec for a local launch (module docstring)
        argv = [*DEEPSPEED_LAUNCH, f"--world_info={local_world_info(slice_)}",
                "--master_addr=127.0.0.1", f"--master_port={master_port}"]
    else:
        argv = list(DEEPSPEED_RUNNER)
        if hostfile_path is None:
            raise ValueError(f"build_command: slice {slice_.include!r} is not local; "
                             "a hostfile_path is required")
        argv += ["--hostfile", str(hostfile_path), "--include", slice_.include,
                 "--master_addr", slice_.hosts[0], "--master_port", str(master_port)]
        if len(slice_.hosts) == 1:
            argv.append("--force_multi")
        if not ssh_check:
            argv.append("--no_ssh_check")
        argv += ["--venv_script", str(job.remote_env_path)]
    if job.module:
        argv.append("--module")
    return argv + [job.script, *job.args]


def local_world_info(slice_: Slice) -> str:
    """``--world_info`` of a local slice, encoded as DeepSpeed's runner encodes it."""
    ((_, slots),) = slice_.parts
    raw = json.dumps({"localhost": list(slots)}).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("utf-8")


def build_env(job: JobSpec, slice_: Slice, *, master_port: int, launcher: Launcher = "deepspeed",
              base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the launched process: ``base_env`` (default ``os.environ``) + ``job.env``
    + what the launcher itself must set."""
    env = dict(os.environ if base_env is None else base_env)
    env.update(job.env)
    env["PYTHONUNBUFFERED"] = "1"  # launcher.log should show output as it happens
    env[STACK_DUMP_DIR_ENV] = str(job.run_dir.resolve())  # where ranks dump stacks on SIGUSR1
    if launcher == "direct":
        ((_, (slot,)),) = slice_.parts
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port),
                   CUDA_VISIBLE_DEVICES=str(slot))
    elif launcher == "srun":
        per_node = _srun_tasks_per_node(slice_)
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # the shim sets them per task
            env.pop(var, None)
        env.update(MASTER_ADDR=slice_.hosts[0], MASTER_PORT=str(master_port),
                   LOCAL_SIZE=str(per_node))
        # The slots are the same on every node of a slice (one node, or whole nodes).
        env["LAG_DS_SLOTS"] = ",".join(map(str, slice_.parts[0][1]))
    elif slice_.is_local:
        env["LOCAL_SIZE"] = str(max(slice_.parts[0][1]) + 1)
    return env


def remote_env_text(job: JobSpec) -> str:
    """Shell text exporting ``job.env``, sourced on each host of a multi-host launch."""
    lines = ["# written by lag_ds.launch for job " + job.name]
    exported = {**job.env, STACK_DUMP_DIR_ENV: str(job.run_dir.resolve())}
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(exported.items())]
    return "\n".join(lines) + "\n"


def is_port_free(port: int) -> bool:
    """Whether ``port`` can be bound on all local interfaces right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def pick_port(*, base_port: int, offset: int, stride: int, in_use: Collection[int],
              max_tries: int = 200) -> int:
    """First port ``base_port + offset + n*stride`` not used by a running job and free here.

    Offsetting by slice index keeps ports stable across runs; the stride keeps slices from
    walking into each other's ports.  Only this machine's ports can be checked: for a slice whose
    master is another host, uniqueness among our jobs is what we can guarantee.
    """
    if stride < 1:
        raise ValueError(f"pick_port: stride must be >= 1, got {stride}")
    for n in range(max_tries):
        port = base_port + offset + n * stride
        if port >= 65536:
            break
        if port not in in_use and is_port_free(port):
            return port
    raise ValueError(f"pick_port: no free port from {base_port + offset} in {max_tries} tries "
                     f"(stride {stride})")
