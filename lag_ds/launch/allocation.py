"""Allocations (hosts with slots) and their division into equal slices, one candidate per slice.

An allocation is what the cluster gave us: hosts, each with a number of slots (GPUs, or CPU ranks
on a CPU box).  LAG trains many small candidate jobs of the same shape, so the allocation is cut
into equal *slices*; a slice is a DeepSpeed ``--include`` spec.

Why the tiling rules are strict:

* Within a host a slice takes consecutive slots, and a host's slots must be a multiple of the
  slice size -- leftover slots would sit idle for the whole LAG phase without anyone noticing.
* A slice larger than a host takes *whole* hosts: a rank group that spans hosts but shares a host
  with another job's ranks would contend for the same NICs and memory, making candidates' speeds
  (and hang timeouts) depend on their neighbours.

Sources: a local box, a DeepSpeed/MPI hostfile (``worker-0 slots=4``), or a SLURM job's
environment (nodes from ``SLURM_JOB_NODELIST``; slots from the GPUs SLURM gave the job, else from
its tasks per node, ``SLURM_TASKS_PER_NODE=2(x3),1`` included -- see :func:`slurm_slots`).  The SLURM nodelist is expanded here (``node[01-03,07],gpu5``) rather than by
``scontrol`` so that the launcher runs, and is tested, without SLURM installed.

Example::

    >>> alloc = Allocation.from_hostfile("hostfile")          # doctest: +SKIP
    >>> [s.include for s in alloc.split(2)]                    # doctest: +SKIP
    ['worker-0:0,1', 'worker-0:2,3', 'worker-1:0,1', 'worker-1:2,3']
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

LOCALHOST = "localhost"
_HOSTFILE_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\d+)\s*(#.*)?$")


@dataclass(frozen=True, kw_only=True)
class Host:
    """A machine and how many slots (accelerators / ranks) the job may use on it."""

    name: str
    slots: int
    slot_ids: tuple[int, ...] | None = None
    """The slots' device ids when they are not ``0..slots-1`` (e.g. a DeepSpeed launch with
    ``--include host:2,3`` or ``--exclude host:0``); None means ``0..slots-1``."""

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() or c in ",:@" for c in self.name):
            raise ValueError(f"Host: invalid host name {self.name!r}")
        if self.slots < 1:
            raise ValueError(f"Host {self.name!r}: slots must be >= 1, got {self.slots}")
        if self.slot_ids is not None:
            ids = tuple(int(i) for i in self.slot_ids)
            if len(ids) != self.slots or len(set(ids)) != len(ids) or min(ids) < 0:
                raise ValueError(f"Host {self.name!r}: slot_ids {list(ids)} must be {self.slots} "
                                 "distinct non-negative ids")
            object.__setattr__(self, "slot_ids", tuple(sorted(ids)))

    @property
    def ids(self) -> tuple[int, ...]:
        """Device ids of this host's slots, ascending."""
        return self.slot_ids if self.slot_ids is not None else tuple(range(self.slots))


@dataclass(frozen=True, kw_only=True)
class Slice:
    """Part of an allocation that runs one job: ``((host, (slot, ...)), ...)`` plus its index."""

    index: int
    parts: tuple[tuple[str, tuple[int, ...]], ...]

    def __iter__(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        return iter(self.parts)

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(host for host, _ in self.parts)

    @property
    def num_slots(self) -> int:
        return sum(len(slots) for _, slots in self.parts)

    @property
    def is_local(self) -> bool:
        """True when every rank runs on this machine (no hostfile, no ssh needed)."""
        return self.hosts == (LOCALHOST,)

    @property
    def include(self) -> str:
        """DeepSpeed ``--include`` syntax: ``host1:0,1@host2:0``."""
        return "@".join(f"{host}:{','.join(map(str, slots))}" for host, slots in self.parts)


@dataclass(frozen=True)
class Allocation:
    """Ordered hosts; rank order (and so the master host) follows this order."""

    hosts: tuple[Host, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "hosts", tuple(self.hosts))
        if not self.hosts:
            raise ValueError("Allocation: no hosts")
        names = [h.name for h in self.hosts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"Allocation: duplicate hosts {dupes}")

    @property
    def num_slots(self) -> int:
        return sum(h.slots for h in self.hosts)

    @property
    def is_local(self) -> bool:
        return len(self.hosts) == 1 and self.hosts[0].name == LOCALHOST

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def local(cls, num_slots: int) -> "Allocation":
        """This machine with ``num_slots`` slots."""
        return cls((Host(name=LOCALHOST, slots=num_slots),))

    @classmethod
    def from_hostfile(cls, path: str | Path) -> "Allocation":
        """Parse a DeepSpeed hostfile: ``hostname slots=N`` lines, ``#`` comments, blank lines."""
        path = Path(path)
        hosts: list[Host] = []
        seen: dict[str, int] = {}
        for number, raw in enumerate(path.read_text().splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = _HOSTFILE_LINE.match(line)
            if m is None:
                raise ValueError(f"{path}:{number}: expected 'hostname slots=N', got {raw!r}")
            name, slots = m["host"], int(m["slots"])
            if name in seen:
                raise ValueError(f"{path}:{number}: host {name!r} already listed on line "
                                 f"{seen[name]}")
            if slots < 1:
                raise ValueError(f"{path}:{number}: slots must be >= 1, got {slots}")
            seen[name] = number
            hosts.append(Host(name=name, slots=slots))
        if not hosts:
            raise ValueError(f"{path}: hostfile lists no hosts")
        return cls(tuple(hosts))

    @classmethod
    def from_slurm(cls, env: Mapping[str, str] | None = None) -> "Allocation":
        """Build from a SLURM job's environment (see :func:`slurm_slots` for the slot counts).

        Raises ``ValueError`` naming the variable when the environment is not a SLURM job's or
        does not add up (e.g. a nodelist of 3 nodes with tasks for 2).
        """
        env = os.environ if env is None else env
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("from_slurm: SLURM_JOB_NODELIST is not set (not inside a SLURM job?)")
        nodes = expand_nodelist(nodelist)
        for var in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
            if env.get(var):
                if env[var] != str(len(nodes)):
                    raise ValueError(f"from_slurm: {var}={env[var]!r} but SLURM_JOB_NODELIST="
                                     f"{nodelist!r} names {len(nodes)} nodes")
                break
        slots = slurm_slots(env, num_nodes=len(nodes))
        return cls(tuple(Host(name=n, slots=k) for n, k in zip(nodes, slots)))

    # ---- output -------------------------------------------------------------------------------

    @classmethod
    def from_include(cls, spec: str) -> "Allocation":
        """Parse DeepSpeed's ``--include`` syntax, ``host1:0,1@host2:2,3``, keeping the ids."""
        hosts: list[Host] = []
        for part in spec.split("@"):
            name, sep, ids = part.partition(":")
            if not sep or not ids:
                raise ValueError(f"Allocation.from_include: expected host:id,id,... in {spec!r}, "
                                 f"got {part!r}")
            try:
                slot_ids = tuple(int(i) for i in ids.split(","))
            except ValueError:
                raise ValueError(f"Allocation.from_include: slot ids must be integers in "
                                 f"{part!r}") from None
            hosts.append(Host(name=name, slots=len(slot_ids), slot_ids=slot_ids))
        return cls(tuple(hosts))

    def hostfile_text(self) -> str:
        """This allocation as a DeepSpeed hostfile (``slots`` covers the highest slot id; the
        jobs' ``--include`` names the ids they use)."""
        return "".join(f"{h.name} slots={max(h.ids) + 1}\n" for h in self.hosts)

    def split(self, slots_per_slice: int) -> list[Slice]:
        """Cut into equal slices of ``slots_per_slice`` slots (see the module docstring)."""
        if slots_per_slice < 1:
            raise ValueError(f"split: slots_per_slice must be >= 1, got {slots_per_slice}")
        slices: list[Slice] = []
        pending: list[Host] = []  # whole hosts gathered for one multi-host slice
        for host in self.hosts:
            if pending or host.slots < slots_per_slice:
                pending.append(host)
                gathered = sum(h.slots for h in pending)
                if gathered > slots_per_slice:
                    raise ValueError(
                        f"split: cannot tile slices of {slots_per_slice} slots: hosts "
                        f"{[h.name for h in pending]} hold {gathered} slots, and a slice larger "
                        "than a host must be made of whole hosts")
                if gathered == slots_per_slice:
                    parts = tuple((h.name, h.ids) for h in pending)
                    slices.append(Slice(index=len(slices), parts=parts))
                    pending = []
                continue
            if host.slots % slots_per_slice:
                raise ValueError(
                    f"split: host {host.name!r} has {host.slots} slots, not a multiple of "
                    f"{slots_per_slice}; {host.slots % slots_per_slice} slots would sit idle")
            for start in range(0, host.slots, slots_per_slice):
                slots = host.ids[start:start + slots_per_slice]
                slices.append(Slice(index=len(slices), parts=((host.name, slots),)))
        if pending:
            raise ValueError(
                f"split: cannot tile slices of {slots_per_slice} slots: the last hosts "
                f"{[h.name for h in pending]} hold only {sum(h.slots for h in pending)} slots")
        return slices


def parse_tasks_per_node(text: str, *, var: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand SLURM's compressed per-node counts: ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in text.strip().split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if m is None:
            raise ValueError(f"{var}={text!r}: expected counts like '2(x3),1'")
        counts += [int(m[1])] * int(m[2] or 1)
    return counts


def _count_ids(text: str) -> int:
    """Number of devices in ``0,1,2``, ``0-3,6`` or ``GPU-uuid,GPU-uuid`` (0 for ``NoDevFiles``)."""
    n = 0
    for item in text.split(","):
        item = item.strip()
        if not item or item == "NoDevFiles":
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", item)
        n += int(m[2]) - int(m[1]) + 1 if m else 1
    return n


def slurm_gpus_per_node(env: Mapping[str, str]) -> int | None:
    """GPUs SLURM gave this job per node, or None: ``SLURM_GPUS_ON_NODE``, else the ids in
    ``SLURM_JOB_GPUS``, else those in ``CUDA_VISIBLE_DEVICES`` (set by SLURM's gres plugin)."""
    value = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if value:
        if not value.isdigit():
            raise ValueError(f"from_slurm: SLURM_GPUS_ON_NODE={value!r} is not a GPU count")
        return int(value) or None
    for var in ("SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        if env.get(var, "").strip():
            return _count_ids(env[var]) or None
    return None


def slurm_slots(env: Mapping[str, str], *, num_nodes: int) -> list[int]:
    """Slots per node of a SLURM job, in nodelist order.

    * GPUs, when the job has any (:func:`slurm_gpus_per_node`): one rank per GPU, the same count
      on every node (SLURM reports the batch node's; ``--gpus-per-node`` makes them equal);
    * else tasks: ``SLURM_NTASKS_PER_NODE`` (only set with ``--ntasks-per-node``), else
      ``SLURM_TASKS_PER_NODE`` (always set; ``2(x3),1`` for ``sbatch -N4 -n7``).
    """
    gpus = slurm_gpus_per_node(env)
    if gpus is not None:
        return [gpus] * num_nodes
    value = env.get("SLURM_NTASKS_PER_NODE", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"from_slurm: SLURM_NTASKS_PER_NODE={value!r} is not a task count")
        return [int(value)] * num_nodes
    value = env.get("SLURM_TASKS_PER_NODE", "").strip()
    if not value:
        raise ValueError("from_slurm: none of SLURM_GPUS_ON_NODE, SLURM_JOB_GPUS, "
                         "CUDA_VISIBLE_DEVICES, SLURM_NTASKS_PER_NODE, SLURM_TASKS_PER_NODE is "
                         "set: request GPUs or tasks (e.g. --ntasks-per-node)")
    counts = parse_tasks_per_node(value)
    if len(counts) != num_nodes:
        raise ValueError(f"from_slurm: SLURM_TASKS_PER_NODE={value!r} gives {len(counts)} nodes, "
                         f"the nodelist has {num_nodes}")
    if min(counts) < 1:
        raise ValueError(f"from_slurm: SLURM_TASKS_PER_NODE={value!r} gives a node no task")
    return counts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``[...]``."""
    items, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"expand_nodelist: unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError(f"expand_nodelist: unbalanced '[' in {text!r}")
    items.append("".join(current))
    return items


def _expand_range(spec: str, *, nodelist: str) -> list[str]:
    out: list[str] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(f"expand_nodelist: bad range {part!r} in {nodelist!r}")
        lo, hi = m[1], m[2] if m[2] is not None else m[1]
        if int(hi) < int(lo):
            raise ValueError(f"expand_nodelist: descending range {part!r} in {nodelist!r}")
        width = len(lo)  # SLURM keeps the zero padding of the lower bound
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def _expand_one(item: str, *, nodelist: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", item)
    if m is None:
        if not item or "]" in item:
            raise ValueError(f"expand_nodelist: bad host {item!r} in {nodelist!r}")
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    rests = _expand_one(tail, nodelist=nodelist) if tail else [""]
    return [head + n + rest for n in _expand_range(m[1], nodelist=nodelist) for rest in rests]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist: ``node[01-03,07],gpu5`` -> node01 node02 node03 node07 gpu5.

    Supports several bracket groups per name (``r[1-2]n[1-2]``) and keeps zero padding.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("expand_nodelist: empty nodelist")
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts.extend(_expand_one(item.strip(), nodelist=nodelist))
    dupes = sorted({h for h in hosts if hosts.count(h) > 1})
    if dupes:
        raise ValueError(f"expand_nodelist: {nodelist!r} names {dupes} more than once")
    return hosts

