"""Hangs with a diagnosis, and JIT-build locks that never cost a race its candidates.

The fake trainer takes torch's own ``FileBaton`` lock the way every DeepSpeed rank does when it
loads an op; a job SIGKILLed while holding it leaves a real stale lock file behind.
"""

import os
import re
import signal
import sys
import time

import fake_trainer as ft
import pytest
from test_launch_jit_build import hold_lock, kill

from lag_ds.launch import Allocation, JobSpec, Journal, run_jobs
from lag_ds.launch.diagnose import hang_hint, summarize_stack


@pytest.fixture
def journal_path(tmp_path):
    path = tmp_path / "journal.jsonl"
    yield path
    for rec in Journal(path).records() if path.exists() else []:  # never leak a stray job
        if rec.pgid is not None:
            try:
                os.killpg(rec.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _run(jobs, journal_path, *, num_slots=2, **kw):
    opts = dict(slots_per_slice=1, journal_path=journal_path, hang_timeout_s=5.0,
                max_retries=0, poll_interval_s=0.02, launcher="direct", kill_grace_s=0.5,
                stack_dump_s=2.0)
    opts.update(kw)
    return run_jobs(jobs, Allocation.local(num_slots), **opts)


def test_job_killed_holding_the_build_lock_does_not_stall_the_others(tmp_path, journal_path,
                                                                      capfd):
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    lock = tmp_path / "ext" / "fake_op" / "lock"
    jobs = [
        # takes the lock and dies with it (as a rank killed during DeepSpeed's op load)
        ft.job(tmp_path, "dies", steps=5, mode="die-holding-lock", fail_at=1, launcher_env=env),
        # already running, reaches the lock a second later: it would wait forever
        ft.job(tmp_path, "waits", steps=5, mode="jit-lock", fail_at=1, lock_delay=1.5,
               launcher_env=env),
        # launched on the freed slice after "dies" ended
        ft.job(tmp_path, "next", steps=5, mode="jit-lock", fail_at=1, launcher_env=env),
    ]
    t0 = time.monotonic()
    results = _run(jobs, journal_path, hang_timeout_s=20.0)
    assert {n: (r.state, r.reason) for n, r in results.items()} == {
        "dies": ("failed", "exit code 137 (SIGKILL)"), "waits": ("finished", ""), "next": ("finished", "")}
    assert time.monotonic() - t0 < 15  # nobody sat out a hang timeout
    assert not lock.exists()
    assert f"removed stale JIT-build lock {lock} (no process holds it" in capfd.readouterr().err


def test_lock_left_by_a_killed_outsider_is_cleared_while_the_job_waits(tmp_path, journal_path,
                                                                     monkeypatch):
    import lag_ds.launch.supervisor as supervisor

    monkeypatch.setattr(supervisor, "LOCK_SWEEP_S", 0.5)
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    lock = tmp_path / "ext" / "fake_op" / "lock"
    outsider = hold_lock(lock)  # not one of our jobs: say, a user's python killed by OOM
    jobs = [ft.job(tmp_path, "waits", steps=5, mode="jit-lock", fail_at=1, launcher_env=env)]
    import threading

    threading.Timer(2.0, kill, args=(outsider,)).start()
    results = _run(jobs, journal_path, num_slots=1, hang_timeout_s=20.0)
    assert (results["waits"].state, results["waits"].attempt) == ("finished", 1)
    assert not lock.exists()


def test_hang_on_a_stale_lock_says_so_and_removes_it(tmp_path, journal_path, monkeypatch):
    import threading

    import lag_ds.launch.supervisor as supervisor

    monkeypatch.setattr(supervisor, "LOCK_SWEEP_S", 1e9)  # only the diagnosis may find it
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    lock = tmp_path / "ext" / "fake_op" / "lock"
    outsider = hold_lock(lock)
    threading.Timer(1.0, kill, args=(outsider,)).start()  # dies holding it: stale from now on
    jobs = [ft.job(tmp_path, "stuck", steps=5, mode="jit-lock", fail_at=1, launcher_env=env)]
    results = _run(jobs, journal_path, num_slots=1, hang_timeout_s=4.0)
    reason = results["stuck"].reason
    assert reason.startswith("hung: no progress for 4s; rank 0 waiting on a JIT-build lock (torch "
                             f"FileBaton.wait); removed stale JIT-build lock {lock} (no process "
                             "holds it or builds there; created "), reason
    assert " while diagnosing; stacks in " in reason and not lock.exists()


def test_hang_on_a_held_build_lock_names_the_lock_and_its_holder(tmp_path, journal_path):
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    lock = tmp_path / "ext" / "fake_op" / "lock"
    holder = hold_lock(lock)  # e.g. a live build by someone else, or a stuck process
    try:
        jobs = [ft.job(tmp_path, "blocked", steps=5, mode="jit-lock", fail_at=1,
                       launcher_env=env),
                ft.job(tmp_path, "sibling", steps=20, sleep_per_step=0.2)]
        # long enough for a start-up on a loaded box (imports are not a hang)
        results = _run(jobs, journal_path, hang_timeout_s=5.0)
    finally:
        kill(holder)
    reason = results["blocked"].reason
    assert reason.startswith("hung: no progress for 5s; rank 0 waiting on a JIT-build lock "
                             f"(torch FileBaton.wait); lock {lock}: held by pid {holder.pid} ("
                             ), reason
    assert reason.endswith(f"stacks in {tmp_path / 'blocked' / 'stack-rank*.txt'}")
    assert results["sibling"].state == "finished"
    # the journal and launcher.log carry it too
    assert Journal(journal_path).replay()["blocked"].reason == reason
    log = (tmp_path / "blocked" / "launcher.log").read_text()
    assert f"=== lag_ds.launch: {reason}" in log and "file_baton.py" in log


def test_stopped_rank_is_named_and_killed(tmp_path, journal_path):
    jobs = [ft.job(tmp_path, "stopped", steps=400, sleep_per_step=0.02),
            ft.job(tmp_path, "sibling", steps=60, sleep_per_step=0.02)]
    run_dir = tmp_path / "stopped"

    import threading

    def stop_it():
        deadline = time.monotonic() + 20
        while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (launch,) = ft.launches(run_dir)
        os.kill(launch["pid"], signal.SIGSTOP)

    threading.Thread(target=stop_it, daemon=True).start()
    t0 = time.monotonic()
    results = _run(jobs, journal_path, hang_timeout_s=3.0, stack_dump_s=0.5)
    assert results["stopped"].reason.startswith(
        "hung: no progress for 3s; rank 0 is stopped (SIGSTOP?)"), results["stopped"].reason
    assert time.monotonic() - t0 < 15
    assert results["sibling"].state == "finished"


def test_no_handler_no_dump_and_the_wrapper_is_not_killed_by_sigusr1(tmp_path, journal_path):
    job = JobSpec(name="plain", script="-c", args=["import time; time.sleep(60)"],
                  run_dir=tmp_path / "plain")
    results = _run([job], journal_path, hang_timeout_s=0.5)
    assert results["plain"].reason == ("hung: no progress for 0.5s; no stack dump: no process "
                                       "of the job handles SIGUSR1")
    # SIGUSR1 went to nobody: the job ended by our SIGTERM, not by an unhandled SIGUSR1
    assert results["plain"].exit_code == -signal.SIGTERM


def test_summaries_of_typical_stacks():
    collective = '''Thread 0x7f01 (most recent call first):
  File "/v/threading.py", line 320 in wait
Current thread 0x7f00 (most recent call first):
  File "/v/torch/distributed/distributed_c10d.py", line 2501 in all_reduce
  File "/v/torch/distributed/c10d_logger.py", line 81 in wrapper
  File "/r/lag_ds/train/loop.py", line 140 in train
'''
    assert summarize_stack(collective) == "in a collective (torch.distributed all_reduce)"
    save = '''Current thread 0x7f00 (most recent call first):
  File "/v/torch/serialization.py", line 900 in _save
  File "/v/deepspeed/runtime/engine.py", line 3300 in save_checkpoint
'''
    assert summarize_stack(save) == "in checkpoint I/O (serialization.py _save)"
    other = '''Current thread 0x7f00 (most recent call first):
  File "/r/x.py", line 7 in spin
  File "/r/x.py", line 9 in <module>
'''
    assert summarize_stack(other) == "at x.py:7 in spin"
    assert summarize_stack("") is None
    assert hang_hint({"0": collective, "1": collective, "2": other}, signalled=3,
                     run_dir="/run/c") == ("ranks 0,1 in a collective (torch.distributed "
                                           "all_reduce); rank 2 at x.py:7 in spin; stacks in "
                                           "/run/c/stack-rank*.txt")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_trainer_main_registers_the_stack_dump(tmp_path):
    import subprocess

    code = ("import os, signal, time, sys\n"
            "from lag_ds.launch.diagnose import register_stack_dump\n"
            "print(register_stack_dump(), flush=True)\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "time.sleep(0.2)\n")
    env = {**os.environ, "LAG_DS_STACK_DUMP_DIR": str(tmp_path), "RANK": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == str(tmp_path / "stack-rank3.txt")
    assert re.search(r'File "<string>", line 4 in <module>',
                     (tmp_path / "stack-rank3.txt").read_text())
    main_src = (ft.HERE.parents[1] / "lag_ds" / "train" / "main.py").read_text()
    assert "register_stack_dump()" in main_src.split("args = parse_args(argv)")[0]


def test_crash_reasons_name_the_signal_and_the_last_error_line(tmp_path):
    from lag_ds.launch.diagnose import last_error_line
    from lag_ds.launch.supervisor import _Supervisor
    from lag_ds.launch.watch import MetricsWatcher

    log = tmp_path / "launcher.log"
    log.write_text("=== lag_ds.launch 2026-01-01 00:00:00: old attempt\n"
                   "ValueError: from the previous attempt\n"
                   "=== lag_ds.launch 2026-01-01 00:01:00: python train.py\n"
                   "Traceback (most recent call last):\n"
                   '  File "x.py", line 1, in <module>\n'
                   "NotADirectoryError: [Errno 20] Not a directory: '/r/checkpoints/global_step4'\n"
                   "[2026] [INFO] [launch.py:100:main] Process 12 exits successfully.\n")
    assert last_error_line(log) == ("NotADirectoryError: [Errno 20] Not a directory: "
                                    "'/r/checkpoints/global_step4'")
    watcher = MetricsWatcher(tmp_path / "metrics.jsonl")
    assert _Supervisor._judge_exit(1, watcher, log) == (
        "failed", "exit code 1: NotADirectoryError: [Errno 20] Not a directory: "
        "'/r/checkpoints/global_step4'", True)
    log.write_text("=== lag_ds.launch 2026-01-01 00:01:00: x\nfake_trainer: crashing\n"
                   "10.77.0.2: RuntimeError: Connection closed by peer\n")
    assert last_error_line(log) == "RuntimeError: Connection closed by peer"
    log.write_text("=== lag_ds.launch 2026-01-01 00:01:00: x\nfake_trainer: crashing at step 3\n")
    assert last_error_line(log) is None
    assert _Supervisor._judge_exit(137, watcher, log)[1] == "exit code 137 (SIGKILL)"


def test_startup_timeout_applies_until_the_first_record(tmp_path, journal_path):
    slow = JobSpec(name="slow_start", script="-c", run_dir=tmp_path / "slow_start",
                   args=["import time; time.sleep(60)"])
    jobs = [slow, ft.job(tmp_path, "stalls", steps=10, mode="hang", fail_at=2)]
    t0 = time.monotonic()
    results = _run(jobs, journal_path, hang_timeout_s=1.0, startup_timeout_s=4.0)
    assert results["slow_start"].reason.startswith("hung: no progress for 4s;")
    assert results["stalls"].reason.startswith("hung: no progress for 1s;")
    assert time.monotonic() - t0 >= 4.0
