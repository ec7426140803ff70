"""Resume after the orchestrator is SIGKILLed: skip, adopt, or restart -- never duplicate."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fake_trainer as ft
import pytest

from lag_ds.launch import Allocation, Journal, JournalRecord, run_jobs
from lag_ds.launch.process import group_members, spawn
from lag_ds.select import load_curve

REPO = Path(__file__).resolve().parent.parent

# The orchestrator, as its own process so that it can be SIGKILLed.
DRIVER = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import fake_trainer as ft
from lag_ds.launch import Allocation, run_jobs
spec = json.loads(sys.argv[1])
root = Path(spec["root"])
jobs = [ft.job(root, name, **opts) for name, opts in spec["jobs"].items()]
res = run_jobs(jobs, Allocation.local(spec["slots"]), slots_per_slice=1,
               journal_path=root / "journal.jsonl", hang_timeout_s=30, poll_interval_s=0.02,
               launcher="direct")
print(json.dumps({{n: r.state for n, r in res.items()}}))
""".format(tests=str(REPO / "tests"))


def _orchestrator(root: Path, jobs: dict, slots: int = 2) -> subprocess.Popen:
    spec = json.dumps({"root": str(root), "jobs": jobs, "slots": slots})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", DRIVER, spec], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _rerun(root: Path, jobs: dict, slots: int = 2):
    specs = [ft.job(root, name, **opts) for name, opts in jobs.items()]
    return run_jobs(specs, Allocation.local(slots), slots_per_slice=1,
                    journal_path=root / "journal.jsonl", hang_timeout_s=30,
                    poll_interval_s=0.02, launcher="direct")


def _wait_for(predicate, timeout=20.0, what=""):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _states(root: Path) -> dict:
    path = root / "journal.jsonl"
    return {n: r.state for n, r in Journal(path).replay().items()} if path.exists() else {}


@pytest.fixture
def root(tmp_path):
    yield tmp_path
    path = tmp_path / "journal.jsonl"
    for rec in Journal(path).records() if path.exists() else []:
        if rec.pgid is not None:
            try:
                os.killpg(rec.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_sigkilled_orchestrator_resumes_without_duplicates(root):
    jobs = {
        "a": {"steps": 3},
        "b": {"steps": 3},
        "e": {"steps": 10, "mode": "crash", "fail_at": 1},
        "c": {"steps": 30, "sleep_per_step": 0.05},   # ends while no orchestrator runs
        "d": {"steps": 90, "sleep_per_step": 0.05},   # still running at the re-run: adopted
    }
    orch = _orchestrator(root, jobs)
    _wait_for(lambda: _states(root).get("c") == "running" and _states(root).get("d") == "running",
              what="c and d running")
    assert {k: v for k, v in _states(root).items() if k in "abe"} == {
        "a": "finished", "b": "finished", "e": "failed"}

    # A second orchestrator on the same journal is refused while the first holds it.
    with pytest.raises(RuntimeError, match="in use by another orchestrator"):
        _rerun(root, jobs)

    orch.send_signal(signal.SIGKILL)
    orch.wait()
    _wait_for(lambda: (root / "c" / "done").exists(), what="c to finish on its own")
    assert not (root / "d" / "done").exists(), "d must still be running for the adoption test"

    results = _rerun(root, jobs)
    assert {n: r.state for n, r in results.items()} == {
        "a": "finished", "b": "finished", "e": "failed", "c": "finished", "d": "finished"}
    assert results["e"].reason == "exit code 1"
    assert results["c"].exit_code == 0 and results["d"].exit_code == 0
    # Exactly one launch each: finished/failed skipped, c's end read from its exit file, d adopted.
    assert {n: len(ft.launches(root / n)) for n in jobs} == {n: 1 for n in jobs}
    running = [r for r in Journal(root / "journal.jsonl").records() if r.state == "running"]
    assert sorted(r.candidate for r in running) == ["a", "b", "c", "d", "e"]
    assert load_curve(root / "d" / "metrics.jsonl").steps.tolist() == list(range(0, 91, 5))


def test_job_killed_with_the_orchestrator_is_restarted_and_resumes(root):
    jobs = {"x": {"steps": 60, "sleep_per_step": 0.04, "eval_interval": 5}}
    orch = _orchestrator(root, jobs)
    _wait_for(lambda: (root / "x" / "ckpt.json").exists(), what="a checkpoint")
    orch.send_signal(signal.SIGKILL)
    orch.wait()
    rec = Journal(root / "journal.jsonl").replay()["x"]
    assert rec.state == "running"
    os.killpg(rec.pgid, signal.SIGKILL)  # the machine "lost" the job too
    _wait_for(lambda: not group_members(rec.pgid), what="the job to die")

    results = _rerun(root, jobs)
    assert (results["x"].state, results["x"].attempt) == ("finished", 1)
    assert len(ft.launches(root / "x")) == 2
    reasons = [r.reason for r in Journal(root / "journal.jsonl").records() if r.candidate == "x"]
    assert "restart: process gone without a recorded end" in reasons
    # the trainer resumed from its checkpoint: one clean curve, no second LAG@0 start
    assert load_curve(root / "x" / "metrics.jsonl").steps.tolist() == list(range(0, 61, 5))


def test_job_killed_by_a_signal_while_the_orchestrator_was_down_is_restarted(root):
    """scancel of an allocation SIGTERMs everything at once: srun may still record 143."""
    jobs = {"x": {"steps": 60, "sleep_per_step": 0.04, "eval_interval": 5}}
    orch = _orchestrator(root, jobs)
    _wait_for(lambda: (root / "x" / "ckpt.json").exists(), what="a checkpoint")
    orch.send_signal(signal.SIGKILL)
    orch.wait()
    rec = Journal(root / "journal.jsonl").replay()["x"]
    (launch,) = ft.launches(root / "x")
    os.kill(launch["pid"], signal.SIGTERM)  # the trainer dies of it, its wrapper records 143
    _wait_for(lambda: not group_members(rec.pgid), what="the job to end")
    assert (root / "x" / "launcher.exit").read_text().strip() == "143"

    results = _rerun(root, jobs)
    assert (results["x"].state, results["x"].attempt) == ("finished", 1)
    reasons = [r.reason for r in Journal(root / "journal.jsonl").records() if r.candidate == "x"]
    assert ("restart: ended by a signal (exit code 143) while the orchestrator was down"
            in reasons)
    assert rec.attempt == 1 and len(ft.launches(root / "x")) == 2
    assert load_curve(root / "x" / "metrics.jsonl").steps.tolist() == list(range(0, 61, 5))


def test_job_started_but_never_journaled_as_running_is_adopted(root):
    # The orchestrator died between spawning the job and journaling its pid.
    job = ft.job(root, "y", steps=20, sleep_per_step=0.03)
    journal = Journal(root / "journal.jsonl")
    journal.append(JournalRecord(candidate="y", state="pending", attempt=1))
    journal.append(JournalRecord(candidate="y", state="pending", attempt=1, port=29533,
                                 include="localhost:0", reason="launching"))
    handle = spawn([sys.executable, "-u", job.script, *job.args], env=os.environ,
                   log_path=job.log_path, exit_path=job.exit_path, pid_path=job.pid_path)
    _wait_for(lambda: job.pid_path.exists(), what="the wrapper's pid file")

    results = run_jobs([job], Allocation.local(1), slots_per_slice=1, journal_path=journal.path,
                       hang_timeout_s=30, poll_interval_s=0.02, launcher="direct")
    handle.popen.wait()
    assert results["y"].state == "finished"
    assert len(ft.launches(root / "y")) == 1
    adopted = [r for r in journal.records() if r.state == "running"]
    assert [(r.pid, r.reason) for r in adopted] == [(handle.pid, "adopted")]


def test_live_job_unknown_to_the_journal_is_refused(root):
    job = ft.job(root, "z", steps=10, mode="hang", fail_at=0)
    handle = spawn([sys.executable, "-u", job.script, *job.args], env=os.environ,
                   log_path=job.log_path, exit_path=job.exit_path, pid_path=job.pid_path)
    try:
        _wait_for(lambda: job.pid_path.exists(), what="the wrapper's pid file")
        with pytest.raises(RuntimeError, match=r"z is running \(pid \d+\) but .* does not know"):
            run_jobs([job], Allocation.local(1), slots_per_slice=1,
                     journal_path=root / "journal.jsonl", launcher="direct")
    finally:
        os.killpg(handle.pgid, signal.SIGKILL)
        handle.popen.wait()
