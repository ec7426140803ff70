"""Allocations: hostfiles, SLURM nodelists, and tiling into slices."""

import re

import pytest

from lag_ds.launch import Allocation, Host, expand_nodelist
from lag_ds.launch.allocation import parse_tasks_per_node


def test_hostfile_parse_with_comments_and_blank_lines(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# cluster\n\nworker-0 slots=4\n  worker-1   slots=2  # half node\n")
    alloc = Allocation.from_hostfile(hf)
    assert alloc.hosts == (Host(name="worker-0", slots=4), Host(name="worker-1", slots=2))
    assert alloc.num_slots == 6 and not alloc.is_local
    assert alloc.hostfile_text() == "worker-0 slots=4\nworker-1 slots=2\n"


@pytest.mark.parametrize("text, line, msg", [
    ("w0 slots=4\nw1 slot=2\n", 2, "expected 'hostname slots=N'"),
    ("w0 slots=4\n\nw1\n", 3, "expected 'hostname slots=N'"),
    ("w0 slots=4\nw0 slots=2\n", 2, "host 'w0' already listed on line 1"),
    ("w0 slots=0\n", 1, "slots must be >= 1"),
    ("w0 slots=4 extra\n", 1, "expected"),
])
def test_hostfile_errors_name_file_and_line(tmp_path, text, line, msg):
    hf = tmp_path / "hostfile"
    hf.write_text(text)
    with pytest.raises(ValueError, match=rf"{hf}:{line}: {msg}"):
        Allocation.from_hostfile(hf)


def test_empty_hostfile(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no hosts"):
        Allocation.from_hostfile(hf)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("gpu-[001-002]-x", ["gpu-001-x", "gpu-002-x"]),
    ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),
    ("n1,n[3-4],m[9]", ["n1", "n3", "n4", "m9"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, msg", [
    ("node[01-03", "unbalanced"),
    ("node01]", "unbalanced"),
    ("node[3-1]", "descending"),
    ("node[a-b]", "bad range"),
    ("n1,n1", "more than once"),
    ("n1,,n2", "bad host"),
])
def test_expand_nodelist_errors(nodelist, msg):
    with pytest.raises(ValueError, match=msg):
        expand_nodelist(nodelist)


def test_from_slurm():
    env = {"SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_NTASKS_PER_NODE": "1"}
    assert Allocation.from_slurm(env).hosts == (Host(name="gpu1", slots=8),
                                                Host(name="gpu2", slots=8))
    env = {"SLURM_JOB_NODELIST": "cpu[1-3]", "SLURM_NTASKS_PER_NODE": "2"}
    assert [h.slots for h in Allocation.from_slurm(env).hosts] == [2, 2, 2]
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST is not set"):
        Allocation.from_slurm({})
    with pytest.raises(ValueError, match="none of SLURM_GPUS_ON_NODE, SLURM_JOB_GPUS"):
        Allocation.from_slurm({"SLURM_JOB_NODELIST": "n1"})
    with pytest.raises(ValueError, match="not a GPU count"):
        Allocation.from_slurm({"SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_ON_NODE": "4(x2)"})


def _slots(**env):
    return [(h.name, h.slots) for h in Allocation.from_slurm(env).hosts]


def test_from_slurm_what_slurm_really_sets():
    # `sbatch -N2 -n4` (no --ntasks-per-node): only SLURM_TASKS_PER_NODE (seen on slurm-wlm 22.05)
    assert _slots(SLURM_JOB_NODELIST="slurmn[1-2]", SLURM_JOB_NUM_NODES="2",
                  SLURM_TASKS_PER_NODE="2(x2)", SLURM_CPUS_ON_NODE="2") == [
        ("slurmn1", 2), ("slurmn2", 2)]
    # `sbatch -N4 -n7`: uneven
    assert _slots(SLURM_JOB_NODELIST="n[01-04]", SLURM_TASKS_PER_NODE="2(x3),1") == [
        ("n01", 2), ("n02", 2), ("n03", 2), ("n04", 1)]
    assert _slots(SLURM_JOB_NODELIST="a,b[1-2]", SLURM_TASKS_PER_NODE="3,1(x2)") == [
        ("a", 3), ("b1", 1), ("b2", 1)]
    # --ntasks-per-node wins over the compressed list
    assert _slots(SLURM_JOB_NODELIST="n[1-2]", SLURM_NTASKS_PER_NODE="1",
                  SLURM_TASKS_PER_NODE="1(x2)") == [("n1", 1), ("n2", 1)]
    # GPUs: one rank per GPU, whichever variable says how many
    tasks = dict(SLURM_JOB_NODELIST="g[1-2]", SLURM_TASKS_PER_NODE="1(x2)")
    assert _slots(**tasks, SLURM_GPUS_ON_NODE="4") == [("g1", 4), ("g2", 4)]
    assert _slots(**tasks, SLURM_JOB_GPUS="0,1,2") == [("g1", 3), ("g2", 3)]
    assert _slots(**tasks, SLURM_JOB_GPUS="0-3,6") == [("g1", 5), ("g2", 5)]
    assert _slots(**tasks, CUDA_VISIBLE_DEVICES="GPU-aa,GPU-bb") == [("g1", 2), ("g2", 2)]
    assert _slots(**tasks, CUDA_VISIBLE_DEVICES="NoDevFiles") == [("g1", 1), ("g2", 1)]
    assert _slots(**tasks, SLURM_GPUS_ON_NODE="0") == [("g1", 1), ("g2", 1)]
    assert parse_tasks_per_node("16") == [16]


@pytest.mark.parametrize("env, message", [
    (dict(SLURM_TASKS_PER_NODE="2(x2)", SLURM_JOB_NODELIST="n[1-3]"),
     "gives 2 nodes, the nodelist has 3"),
    (dict(SLURM_TASKS_PER_NODE="2(y2)", SLURM_JOB_NODELIST="n1"), "expected counts like"),
    (dict(SLURM_TASKS_PER_NODE="0", SLURM_JOB_NODELIST="n1"), "gives a node no task"),
    (dict(SLURM_NTASKS_PER_NODE="x", SLURM_JOB_NODELIST="n1"), "not a task count"),
    (dict(SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_NUM_NODES="3"),
     "SLURM_JOB_NUM_NODES='3' but"),
])
def test_from_slurm_refuses_what_does_not_add_up(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Allocation.from_slurm(env)


def test_split_within_hosts():
    alloc = Allocation((Host(name="a", slots=4), Host(name="b", slots=4)))
    slices = alloc.split(2)
    assert [s.include for s in slices] == ["a:0,1", "a:2,3", "b:0,1", "b:2,3"]
    assert [s.index for s in slices] == [0, 1, 2, 3]
    assert list(slices[1]) == [("a", (2, 3))]
    assert [s.include for s in Allocation.local(3).split(1)] == [
        "localhost:0", "localhost:1", "localhost:2"]
    assert all(s.is_local for s in Allocation.local(2).split(1))


def test_split_across_whole_hosts():
    alloc = Allocation(tuple(Host(name=f"n{i}", slots=2) for i in range(4)))
    slices = alloc.split(4)
    assert [s.include for s in slices] == ["n0:0,1@n1:0,1", "n2:0,1@n3:0,1"]
    assert slices[0].hosts == ("n0", "n1") and slices[0].num_slots == 4
    assert not slices[0].is_local
    assert [s.include for s in alloc.split(8)] == ["n0:0,1@n1:0,1@n2:0,1@n3:0,1"]


@pytest.mark.parametrize("hosts, size, msg", [
    ([("a", 6)], 4, "has 6 slots, not a multiple of 4; 2 slots would sit idle"),
    ([("a", 2), ("b", 2), ("c", 2)], 4, r"last hosts \['c'\] hold only 2 slots"),
    ([("a", 2), ("b", 4)], 4, "hold 6 slots, and a slice larger than a host must be made of whole"),
    ([("a", 2)], 0, "slots_per_slice must be >= 1"),
])
def test_split_refuses_impossible_tilings(hosts, size, msg):
    alloc = Allocation(tuple(Host(name=n, slots=s) for n, s in hosts))
    with pytest.raises(ValueError, match=msg):
        alloc.split(size)


def test_bad_hosts():
    with pytest.raises(ValueError, match="duplicate hosts"):
        Allocation((Host(name="a", slots=1), Host(name="a", slots=1)))
    with pytest.raises(ValueError, match="invalid host name"):
        Host(name="a:1", slots=1)
    with pytest.raises(ValueError, match="no hosts"):
        Allocation(())
