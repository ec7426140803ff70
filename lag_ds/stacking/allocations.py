"""Parse the ``allocation`` string of a LAG run into a launcher :class:`Allocation`."""

from __future__ import annotations

import os

from lag_ds.launch import Allocation


def parse_allocation(text: str) -> Allocation:
    kind, _, arg = text.partition(":")
    if kind == "local":
        try:
            return Allocation.local(int(arg))
        except ValueError:
            raise ValueError(f"allocation={text!r}: expected local:<number of slots>") from None
    if kind == "hostfile":
        if not arg:
            raise ValueError(f"allocation={text!r}: expected hostfile:<path>")
        return Allocation.from_hostfile(arg)
    if kind == "include":
        return Allocation.from_include(arg)
    if kind == "slurm":
        return Allocation.from_slurm(os.environ)
    raise ValueError(f"allocation={text!r}: expected local:N, hostfile:PATH, "
                     "include:HOST:IDS[@HOST:IDS] or slurm")
