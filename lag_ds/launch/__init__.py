"""Launching candidate jobs: allocations, slices, commands, supervision, journal.

Knows nothing of models: a job is a command + environment + run directory, and the only thing
read back is ``metrics.jsonl``.  Entry point: :func:`run_jobs`; call
:func:`prepare_deepspeed_ops` once before the first DeepSpeed job (it builds/loads DeepSpeed's
JIT ops and removes stale build locks, see ``jit_build.py``).  Launchers: the ``deepspeed``
runner (local, or hostfile + pdsh/ssh), ``srun`` job steps inside a SLURM allocation, and
``direct`` for tests.  A hung job is stopped with a diagnosis of what it waited on
(``diagnose.py``).
"""

from lag_ds.launch.allocation import LOCALHOST, Allocation, Host, Slice, expand_nodelist
from lag_ds.launch.jit_build import PreparedOps, clear_stale_locks, prepare_deepspeed_ops
from lag_ds.launch.jobs import (
    DEEPSPEED_RUNNER,
    DEFAULT_BASE_PORT,
    JobSpec,
    Launcher,
    build_command,
    build_env,
    is_port_free,
    pick_port,
    remote_env_text,
)
from lag_ds.launch.journal import FINAL_STATES, STATES, Journal, JournalRecord
from lag_ds.launch.progress import ProgressReporter, ProgressRow, format_table
from lag_ds.launch.supervisor import NON_FINITE_EXIT_CODE, JobResult, run_jobs
from lag_ds.launch.watch import MetricsWatcher

__all__ = [
    "LOCALHOST", "Allocation", "Host", "Slice", "expand_nodelist",
    "DEEPSPEED_RUNNER", "DEFAULT_BASE_PORT", "JobSpec", "Launcher", "build_command", "build_env",
    "is_port_free", "pick_port", "remote_env_text",
    "FINAL_STATES", "STATES", "Journal", "JournalRecord",
    "ProgressReporter", "ProgressRow", "format_table",
    "NON_FINITE_EXIT_CODE", "JobResult", "run_jobs",
    "MetricsWatcher",
    "PreparedOps", "clear_stale_locks", "prepare_deepspeed_ops",
]
