"""Command and environment building, ports, job specs."""

import socket
import subprocess
import sys

import pytest
from deepspeed.launcher.runner import encode_world_info

from lag_ds.launch import (
    DEEPSPEED_RUNNER,
    Allocation,
    Host,
    JobSpec,
    build_command,
    build_env,
    is_port_free,
    pick_port,
    remote_env_text,
)

DS = list(DEEPSPEED_RUNNER)
LAUNCH = [sys.executable, "-u", "-m", "deepspeed.launcher.launch"]


@pytest.fixture
def job(tmp_path):
    return JobSpec(name="cand-0", script="train.py", args=["--k", "200"],
                   run_dir=tmp_path / "cand-0", env={"GLOO_SOCKET_IFNAME": "eth0"})


def test_deepspeed_runner_is_the_deepspeed_console_script():
    # `deepspeed` == `python -m deepspeed.launcher.runner` with *this* interpreter.
    assert DS == [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]


def test_local_deepspeed_command(job):
    # A local slice skips the runner and calls what it would exec: DeepSpeed's per-node launcher
    # with the runner's base64 world_info.
    s = Allocation.local(4).split(2)[1]
    argv = build_command(job, s, master_port=29501)
    assert argv[:4] == LAUNCH and argv[5:] == [
        "--master_addr=127.0.0.1", "--master_port=29501", "train.py", "--k", "200"]
    assert argv[4] == f"--world_info={encode_world_info({'localhost': [2, 3]})}"
    env = build_env(job, s, master_port=29501, base_env={"PATH": "/bin"})
    # The CPU accelerator sizes localhost from LOCAL_SIZE; slot 3 needs at least 4.
    # Ranks dump their stacks on SIGUSR1 into the run directory (diagnose.py).
    assert env == {"PATH": "/bin", "GLOO_SOCKET_IFNAME": "eth0", "PYTHONUNBUFFERED": "1",
                   "LOCAL_SIZE": "4", "LAG_DS_STACK_DUMP_DIR": str(job.run_dir)}


def test_module_job(tmp_path):
    job = JobSpec(name="m", script="lag_ds.train.main", args=["--x"], run_dir=tmp_path, module=True)
    s = Allocation.local(1).split(1)[0]
    assert build_command(job, s, master_port=29500)[5:] == [
        "--master_addr=127.0.0.1", "--master_port=29500", "--module", "lag_ds.train.main", "--x"]
    assert build_command(job, s, master_port=29500, launcher="direct") == [
        sys.executable, "-u", "-m", "lag_ds.train.main", "--x"]


def test_multi_host_command(job, tmp_path):
    alloc = Allocation(tuple(Host(name=f"n{i}", slots=2) for i in range(4)))
    s = alloc.split(4)[1]
    argv = build_command(job, s, master_port=29600, hostfile_path=tmp_path / "hostfile",
                         ssh_check=False)
    assert argv == DS + [
        "--hostfile", str(tmp_path / "hostfile"), "--include", "n2:0,1@n3:0,1",
        "--master_addr", "n2", "--master_port", "29600", "--no_ssh_check",
        "--venv_script", str(job.remote_env_path), "train.py", "--k", "200"]
    # No LOCAL_SIZE for remote hosts: their slots come from the hostfile.
    assert "LOCAL_SIZE" not in build_env(job, s, master_port=29600, base_env={})


def test_single_remote_host_forces_multi_node_mode(job, tmp_path):
    # Without --force_multi the runner would start the ranks of "n1:0,1" on *this* machine.
    s = Allocation((Host(name="n0", slots=2), Host(name="n1", slots=2))).split(2)[1]
    argv = build_command(job, s, master_port=29600, hostfile_path=tmp_path / "hf")
    assert argv[len(DS):len(DS) + 9] == ["--hostfile", str(tmp_path / "hf"), "--include",
                                         "n1:0,1", "--master_addr", "n1", "--master_port",
                                         "29600", "--force_multi"]
    with pytest.raises(ValueError, match="hostfile_path is required"):
        build_command(job, s, master_port=29600)


def test_direct_command_and_env(job):
    s = Allocation.local(2).split(1)[1]
    assert build_command(job, s, master_port=29555, launcher="direct") == [
        sys.executable, "-u", "train.py", "--k", "200"]
    env = build_env(job, s, master_port=29555, launcher="direct", base_env={})
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                "CUDA_VISIBLE_DEVICES")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29555", "CUDA_VISIBLE_DEVICES": "1"}
    with pytest.raises(ValueError, match="'direct' runs one local slot"):
        build_command(job, Allocation.local(2).split(2)[0], master_port=1, launcher="direct")
    with pytest.raises(ValueError, match="launcher must be one of"):
        build_command(job, s, master_port=1, launcher="torchrun")


def test_remote_env_survives_a_shell(job, tmp_path):
    job = JobSpec(name="j", script="x.py", run_dir=tmp_path,
                  env={"A": "it's \"q\" $HOME; rm -rf /", "B": "two words"})
    script = tmp_path / "env.sh"
    script.write_text(remote_env_text(job))
    out = subprocess.run(["bash", "-c", f"source {script}; printf '%s|%s' \"$A\" \"$B\""],
                         capture_output=True, text=True, check=True).stdout
    assert out == "it's \"q\" $HOME; rm -rf /|two words"


def test_jobspec_validation(tmp_path):
    with pytest.raises(ValueError, match="launcher-owned variables \\['MASTER_PORT'\\]"):
        JobSpec(name="a", script="x.py", run_dir=tmp_path, env={"MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="name must be"):
        JobSpec(name="a b", script="x.py", run_dir=tmp_path)
    j = JobSpec(name="a", script="x.py", args=["1", 2], run_dir=str(tmp_path))
    assert j.args == ("1", "2") and j.run_dir == tmp_path
    assert j.metrics_path == tmp_path / "metrics.jsonl"


def test_pick_port_skips_used_and_bound_ports():
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        bound = s.getsockname()[1]
        assert not is_port_free(bound)
        # offset lands on the bound port: skip it by the stride
        assert pick_port(base_port=bound - 1, offset=1, stride=3, in_use=set()) == bound + 3
        # ... and a port another running job holds is skipped too
        assert pick_port(base_port=bound - 1, offset=1, stride=3, in_use={bound + 3}) == bound + 6
    with pytest.raises(ValueError, match="no free port"):
        pick_port(base_port=29500, offset=0, stride=1, in_use=set(range(29500, 29510)),
                  max_tries=10)


def test_srun_step_command_and_env(job):
    from lag_ds.launch import Host

    alloc = Allocation((Host(name="n1", slots=4), Host(name="n2", slots=4)))
    part = alloc.split(2)[1]  # n1:2,3
    argv = build_command(job, part, master_port=29600, launcher="srun")
    assert argv[:9] == ["srun", "--overlap", "--job-name=cand-0", "--nodes=1", "--ntasks=2",
                        "--ntasks-per-node=2", "--nodelist=n1", "--kill-on-bad-exit=1",
                        "--export=ALL"]
    assert argv[-5:] == [sys.executable, "-u", "train.py", "--k", "200"]
    env = build_env(job, part, master_port=29600, launcher="srun",
                    base_env={"PATH": "/bin", "RANK": "7", "SLURM_JOB_ID": "5"})
    assert {k: env.get(k) for k in ("RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE",
                                    "LAG_DS_SLOTS", "SLURM_JOB_ID")} == {
        "RANK": None, "MASTER_ADDR": "n1", "MASTER_PORT": "29600", "LOCAL_SIZE": "2",
        "LAG_DS_SLOTS": "2,3", "SLURM_JOB_ID": "5"}
    wide = alloc.split(8)[0]
    assert build_command(job, wide, master_port=1, launcher="srun")[3:7] == [
        "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--nodelist=n1,n2"]
    with pytest.raises(ValueError, match="'srun' needs SLURM node names"):
        build_command(job, Allocation.local(2).split(1)[0], master_port=1, launcher="srun")
    uneven = Allocation((Host(name="a", slots=2), Host(name="b", slots=1))).split(3)[0]
    with pytest.raises(ValueError, match="same number of slots on each node"):
        build_command(job, uneven, master_port=1, launcher="srun")


def test_srun_rank_shim_sets_ranks_and_narrows_gpus(job):
    """The per-task shim, run as srun would run it (SLURM_* set per task)."""
    from lag_ds.launch import Host

    part = Allocation((Host(name="n1", slots=4),)).split(2)[1]
    argv = build_command(job, part, master_port=1, launcher="srun")
    shim = argv[argv.index("/bin/sh"):-5]
    probe = ["sh", "-c", 'echo "$RANK $LOCAL_RANK $WORLD_SIZE $CUDA_VISIBLE_DEVICES"']
    env = build_env(job, part, master_port=1, launcher="srun", base_env={"PATH": "/bin:/usr/bin"})
    env.update(SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_STEP_NUM_TASKS="4",
               CUDA_VISIBLE_DEVICES="4,5,6,7")  # the job's GPUs as SLURM exposes them
    out = subprocess.run(shim + probe, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "1", "4", "6,7"]  # slots 2,3 of the node's visible GPUs
    del env["CUDA_VISIBLE_DEVICES"]  # a CPU node: nothing to narrow
    out = subprocess.run(shim + probe, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "1", "4"]
