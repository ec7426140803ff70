"""Through the real DeepSpeed 0.19.8 runner on this CPU box, with the fake trainer.

Each launch costs ~3 s of runner import plus ~3 s of ``deepspeed.launcher.launch`` import on
2 cores, so these tests are marked slow (they still run in the suite).
"""

import json
import os
import stat

import fake_trainer as ft
import pytest

from lag_ds.launch import Allocation, Journal, run_jobs

# Stands in for pdsh (and the ssh under it): runs the command once per -w host *on this machine*,
# with %n replaced by the host's index and a clean environment, as an ssh login would have --
# so whatever reaches the ranks went through the runner's own export machinery.
FAKE_PDSH = r"""#!/bin/bash
while [ $# -gt 0 ]; do
  case "$1" in -S) shift;; -f) shift 2;; -w) hosts="$2"; shift 2;; *) break;; esac
done
cmd="$*"
echo "$hosts" >> "$(dirname "$0")/pdsh_hosts"
IFS=, read -ra hs <<< "$hosts"
pids=(); i=0
for h in "${hs[@]}"; do
  env -i PATH=/usr/bin:/bin HOME="$HOME" bash -c "${cmd//%n/$i}" & pids+=($!); i=$((i+1))
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""


@pytest.mark.slow
def test_real_deepspeed_launcher_local_two_ranks(tmp_path):
    probe = "value with spaces"
    jobs = [ft.job(tmp_path, "ok", steps=6, sleep_per_step=0.02,
                   launcher_env={"FAKE_PROBE": probe}),
            ft.job(tmp_path, "diverges", steps=6, mode="nan-exit", fail_at=2)]
    results = run_jobs(jobs, Allocation.local(2), slots_per_slice=2,
                       journal_path=tmp_path / "journal.jsonl", hang_timeout_s=90,
                       poll_interval_s=0.1, launcher="deepspeed")
    assert (results["ok"].state, results["ok"].exit_code) == ("finished", 0)
    # The trainer's exit code 3 comes back through launch.py and the runner.
    assert (results["diverges"].state, results["diverges"].reason,
            results["diverges"].exit_code) == ("failed", "non-finite loss", 3)

    port = [r.port for r in Journal(tmp_path / "journal.jsonl").records()
            if r.candidate == "ok" and r.state == "running"][0]
    ranks = sorted(ft.launches(tmp_path / "ok", 0) + ft.launches(tmp_path / "ok", 1),
                   key=lambda r: r["rank"])
    assert [(r["rank"], r["world_size"], r["local_rank"], r["local_rank_arg"], r["master_port"],
             r["env_probe"]) for r in ranks] == [
        (0, 2, "0", 0, str(port), probe), (1, 2, "1", 1, str(port), probe)]
    log = (tmp_path / "ok" / "launcher.log").read_text()
    assert "deepspeed.launcher.launch --world_info=" in log and "--master_port=" in log
    assert json.loads((tmp_path / "ok" / "done").read_text())["step"] == 6


@pytest.mark.slow
def test_real_deepspeed_runner_multi_host_path(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pdsh = bin_dir / "pdsh"
    pdsh.write_text(FAKE_PDSH)
    pdsh.chmod(pdsh.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")  # two "hosts", one machine
    probe = "it's \"quoted\" $HOME"
    jobs = [ft.job(tmp_path, "mh", steps=6, sleep_per_step=0.02,
                   launcher_env={"FAKE_PROBE": probe})]
    results = run_jobs(jobs, Allocation.from_hostfile(hostfile), slots_per_slice=2,
                       journal_path=tmp_path / "journal.jsonl", hang_timeout_s=90,
                       poll_interval_s=0.1, launcher="deepspeed", ssh_check=False)
    assert results["mh"].state == "finished"
    assert (bin_dir / "pdsh_hosts").read_text() == "127.0.0.1,localhost\n"
    ranks = sorted(ft.launches(tmp_path / "mh", 0) + ft.launches(tmp_path / "mh", 1),
                   key=lambda r: r["rank"])
    # One rank per host (node_rank via %n), and the job env crossed the clean "ssh" environment
    # only through --venv_script.
    assert [(r["rank"], r["world_size"], r["local_rank"], r["env_probe"]) for r in ranks] == [
        (0, 2, "0", probe), (1, 2, "0", probe)]
    # the runner got the allocation's own hostfile, written next to the journal
    assert (tmp_path / "journal.hostfile").read_text() == hostfile.read_text()
    log = (tmp_path / "mh" / "launcher.log").read_text()
    assert f"--hostfile {tmp_path / 'journal.hostfile'}" in log
