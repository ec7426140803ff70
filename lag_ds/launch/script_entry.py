"""``deepspeed launch_scripts/X.sh``: run a launch script's shell part once, from rank 0.

Users start their jobs with the DeepSpeed runner (``deepspeed [--num_gpus N | --num_nodes N |
--include ... | --hostfile HF] launch_scripts/ul2_grow.sh``).  The runner hands the script to
*Python* on every rank (``python -u SCRIPT --local_rank=N``), so each launch script is a
bash/Python polyglot: bash runs its shell part, Python runs a three-line tail that calls
:func:`main`.  A LAG run is an orchestrator, not an SPMD program, so:

* exactly one process orchestrates: global rank 0 re-executes the script with bash, with the
  allocation the runner resolved from its own resource flags in ``ALLOCATION``;
* every other rank exits 0 at once, holding no device and no port (the candidate jobs need
  them), so the runner does not report a failure;
* the variables the launcher set for the ranks (``RANK``, ``MASTER_PORT``, ``CUDA_VISIBLE_DEVICES``
  of one node, ...) are removed before bash runs: the orchestrator starts its own ``deepspeed``
  jobs, which must see the whole node and choose their own ports.

Where the allocation comes from: ``deepspeed.launcher.launch`` (the per-node process the runner
starts, locally or through pdsh) receives it as ``--world_info=<base64 JSON {host: [ids]}>``,
after ``--num_gpus/--num_nodes/--include/--exclude/--hostfile`` (and DeepSpeed's default
``/job/hostfile``) were applied; the ranks are its children, so rank 0 reads its parent's command
line.  Under ``deepspeed --launcher slurm`` (``srun``) the ranks' rank is ``SLURM_PROCID`` and
the allocation is the SLURM job's.  Anything else is refused with the reason.

Example (what the polyglot tail of a launch script does)::

    >>> import sys
    >>> from lag_ds.launch.script_entry import main
    >>> sys.exit(main(__file__, sys.argv[1:]))                      # doctest: +SKIP
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from lag_ds.launch.allocation import Allocation, Host

# Variables deepspeed.launcher.launch sets for its ranks; the orchestrator's own jobs set theirs.
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "CROSS_RANK", "CROSS_SIZE", "CUDA_VISIBLE_DEVICES")
_LAUNCH_MODULE = "deepspeed.launcher.launch"


def world_info_from_cmdline(argv: Sequence[str]) -> dict[str, list[int]] | None:
    """``{host: [device ids]}`` from a ``deepspeed.launcher.launch`` command line, else None."""
    if _LAUNCH_MODULE not in argv:
        return None
    for arg in argv:
        if arg.startswith("--world_info="):
            raw = arg.split("=", 1)[1]
            info = json.loads(base64.urlsafe_b64decode(raw))
            return {str(host): [int(i) for i in ids] for host, ids in info.items()}
    return None


def _parent_cmdline() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def allocation_from_world_info(info: Mapping[str, Sequence[int]]) -> Allocation:
    """The runner's resolved resources as an allocation (hosts in rank order, device ids kept).

    The runner names this machine ``localhost`` when it had no hostfile; then jobs stay local.
    """
    if not info:
        raise ValueError("the deepspeed launcher passed an empty world_info")
    return Allocation(tuple(Host(name=host, slots=len(ids), slot_ids=tuple(ids))
                            for host, ids in info.items()))


def allocation_spec(alloc: Allocation) -> str:
    """The ``--allocation`` string of ``python -m lag_ds.stacking`` for ``alloc``."""
    return "include:" + "@".join(f"{h.name}:{','.join(map(str, h.ids))}" for h in alloc.hosts)


def resolve(env: Mapping[str, str], parent_argv: Sequence[str]) -> tuple[int, str]:
    """(global rank of this process, allocation spec) under the DeepSpeed runner."""
    info = world_info_from_cmdline(parent_argv)
    if info is not None:
        return int(env.get("RANK", "0")), allocation_spec(allocation_from_world_info(info))
    if "SLURM_PROCID" in env:  # deepspeed --launcher slurm: srun starts `python -u script` per task
        return int(env["SLURM_PROCID"]), "slurm"
    raise ValueError("this launch script was started by Python, but not by the deepspeed runner "
                     "(no deepspeed.launcher.launch parent, no SLURM_PROCID); run it with bash "
                     "(`launch_scripts/X.sh`) or with "
                     "`deepspeed [resource flags] launch_scripts/X.sh`")


def main(script: str, argv: Sequence[str]) -> int:
    """Entry of a launch script's Python tail: rank 0 re-executes ``script`` with bash."""
    args = [a for a in argv if not a.startswith("--local_rank")]
    try:
        rank, spec = resolve(os.environ, _parent_cmdline())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0  # the orchestrator runs on rank 0; this rank must not hold a device or a port
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["ALLOCATION"] = spec
    env.setdefault("PYTHON", sys.executable)
    print(f"[lag] started by the deepspeed launcher: orchestrating on rank 0 with allocation "
          f"{spec} (the other ranks exit)", file=sys.stderr, flush=True)
    bash = "/bin/bash" if os.path.exists("/bin/bash") else "bash"
    os.execvpe(bash, [bash, os.path.abspath(script), *args], env)
    return 1  # not reached


__all__ = ["LAUNCHER_ENV", "allocation_from_world_info", "allocation_spec", "main",
           "resolve", "world_info_from_cmdline"]
