"""The launch scripts' deepspeed-runner entry: allocation from the runner, one orchestrator."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
from conftest import REPO, deepspeed_env

from lag_ds.launch import Allocation
from lag_ds.launch import script_entry as se


def launch_argv(info: dict) -> list[str]:
    raw = base64.urlsafe_b64encode(json.dumps(info).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={raw}",
            "--master_addr=127.0.0.1", "--master_port=29500", "launch_scripts/ul2_grow.sh"]


def test_allocation_keeps_the_device_ids_the_runner_resolved():
    # `deepspeed --exclude localhost:0` on a 3-slot box -> world_info {"localhost": [1, 2]}
    rank, spec = se.resolve({"RANK": "0"}, launch_argv({"localhost": [1, 2]}))
    assert (rank, spec) == (0, "include:localhost:1,2")
    alloc = Allocation.from_include(spec.split(":", 1)[1])
    assert [s.include for s in alloc.split(1)] == ["localhost:1", "localhost:2"]
    assert [s.include for s in alloc.split(2)] == ["localhost:1,2"]
    # Two hosts from a hostfile, rank order kept; the hostfile covers the highest id.
    rank, spec = se.resolve({"RANK": "3"}, launch_argv({"w1": [0, 1], "w2": [0, 3]}))
    assert (rank, spec) == (3, "include:w1:0,1@w2:0,3")
    alloc = Allocation.from_include(spec.split(":", 1)[1])
    assert alloc.hostfile_text() == "w1 slots=2\nw2 slots=4\n"
    assert [s.include for s in alloc.split(2)] == ["w1:0,1", "w2:0,3"]


def test_slurm_launcher_and_refusals():
    assert se.resolve({"SLURM_PROCID": "2"}, ["srun"]) == (2, "slurm")
    with pytest.raises(ValueError, match="not by the deepspeed runner"):
        se.resolve({}, ["bash"])
    assert se.world_info_from_cmdline(["python", "train.py", "--world_info=xx"]) is None
    with pytest.raises(ValueError, match="slot_ids"):
        Allocation.from_include("h:0,0")
    with pytest.raises(ValueError, match="expected host:id"):
        Allocation.from_include("h")


def test_other_ranks_exit_zero_without_running_anything(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(se, "_parent_cmdline", lambda: launch_argv({"localhost": [0, 1]}))
    monkeypatch.setattr(se.os, "execvpe", lambda *a: pytest.fail(f"rank 1 ran {a}"))
    assert se.main("launch_scripts/ul2_grow.sh", ["--local_rank=1"]) == 0
    assert capsys.readouterr().err == ""


def test_rank0_reexecutes_the_script_with_bash_without_the_launchers_variables(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(se, "_parent_cmdline", lambda: launch_argv({"localhost": [1]}))
    seen = {}

    def fake_exec(path, argv, env):
        seen.update(path=path, argv=argv, env=env)
        raise SystemExit(0)

    monkeypatch.setattr(se.os, "execvpe", fake_exec)
    with pytest.raises(SystemExit):
        se.main("launch_scripts/ul2_grow.sh", ["--local_rank=0", "--lag-steps", "5"])
    assert seen["argv"][0].endswith("bash") and seen["argv"][1].endswith("ul2_grow.sh")
    assert seen["argv"][2:] == ["--lag-steps", "5"]
    assert seen["env"]["ALLOCATION"] == "include:localhost:1"
    assert not {"RANK", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"} & set(seen["env"])


def test_python_without_the_runner_is_refused_in_one_line():
    proc = subprocess.run([sys.executable, "launch_scripts/ul2_grow.sh"], cwd=REPO,
                          env=deepspeed_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "not by the deepspeed runner" in proc.stderr


def test_every_launch_script_is_a_valid_bash_and_python_polyglot():
    scripts = sorted((REPO / "launch_scripts").glob("*.sh"))
    assert scripts
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
        compile(script.read_text(), str(script), "exec")
        assert "lag_ds.launch.script_entry" in script.read_text(), script


def test_pin_ninja_puts_the_interpreters_ninja_first(tmp_path):
    from pathlib import Path

    from lag_ds.toolchain import pin_ninja

    env = {"PATH": f"/usr/bin:{Path(sys.executable).parent}:/bin"}
    has_ninja = (Path(sys.executable).parent / "ninja").exists()
    assert pin_ninja(env) is has_ninja
    if has_ninja:
        assert env["PATH"].split(":") == [str(Path(sys.executable).parent), "/usr/bin", "/bin"]
        assert pin_ninja(env) and env["PATH"].count(str(Path(sys.executable).parent)) == 1
