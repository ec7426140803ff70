"""Supervision with the fake trainer: waves, ports, crash / hang / NaN, retries, progress."""

import dataclasses
import fcntl
import io
import json
import os
import re
import signal
import time

import fake_trainer as ft
import pytest

from lag_ds.launch import (
    Allocation,
    Journal,
    MetricsWatcher,
    ProgressReporter,
    ProgressRow,
    format_table,
    run_jobs,
)
from lag_ds.launch.process import group_members
from lag_ds.launch.progress import describe_running, format_duration
from lag_ds.launch.watch import last_status_line
from lag_ds.select import load_curve, select_lag


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
                max_retries=0, poll_interval_s=0.02, launcher="direct", kill_grace_s=0.5)
    opts.update(kw)
    return run_jobs(jobs, Allocation.local(num_slots), **opts)


def test_waves_five_jobs_over_two_slices(tmp_path, journal_path):
    jobs = [ft.job(tmp_path, f"c{i}", steps=8, sleep_per_step=0.03, loss0=3.0 + i)
            for i in range(5)]
    results = _run(jobs, journal_path)
    assert {n: r.state for n, r in results.items()} == {f"c{i}": "finished" for i in range(5)}
    assert all(r.exit_code == 0 and r.attempt == 1 for r in results.values())

    # From the fake trainer's own start/end times: never more than 2 at once, and 2 at some point.
    events = []
    for j in jobs:
        (start,) = [r["time"] for r in ft.launches(j.run_dir)]
        events += [(start, 1), (json.loads((j.run_dir / "done").read_text())["time"], -1)]
    running, peak = 0, 0
    for _, delta in sorted(events):
        running += delta
        peak = max(peak, running)
    assert peak == 2

    # From the journal: a slice is never given to two live jobs; concurrent ports differ; each
    # job saw the port the journal recorded.
    busy: dict[str, str] = {}
    ports: dict[str, int] = {}
    for rec in Journal(journal_path).records():
        if rec.state == "running":
            assert rec.include not in busy.values()
            assert rec.port not in ports.values()
            busy[rec.candidate], ports[rec.candidate] = rec.include, rec.port
            (launch,) = ft.launches(tmp_path / rec.candidate)
            assert launch["master_port"] == str(rec.port)
        elif rec.is_final:
            busy.pop(rec.candidate)
            ports.pop(rec.candidate)
    assert not busy
    # the curves are what the selector will read
    assert load_curve(jobs[4].metrics_path).steps.tolist() == [0, 5, 8]


def test_crash_hang_nan_fail_with_reasons_while_siblings_finish(tmp_path, journal_path):
    jobs = [
        ft.job(tmp_path, "ok_a", steps=30, sleep_per_step=0.02),
        ft.job(tmp_path, "crash", steps=30, mode="crash", fail_at=3),
        ft.job(tmp_path, "hang", steps=30, mode="hang", fail_at=3),
        ft.job(tmp_path, "nan", steps=500, sleep_per_step=0.01, mode="nan", fail_at=4),
        ft.job(tmp_path, "nan_exit", steps=30, mode="nan-exit", fail_at=2),
        ft.job(tmp_path, "ok_b", steps=30, sleep_per_step=0.02),
    ]
    results = _run(jobs, journal_path, hang_timeout_s=3.0, max_retries=0)
    got = {n: (r.state, r.reason) for n, r in results.items()}
    # the hang's reason says where the rank was stuck (its stack, dumped before the kill)
    assert re.fullmatch(r"hung: no progress for 3s; rank 0 at fake_trainer\.py:\d+ in main; "
                        r"stacks in .*/hang/stack-rank\*\.txt", got["hang"][1]), got["hang"]
    got["hang"] = (got["hang"][0], got["hang"][1].split(";")[0])
    assert got == {
        "ok_a": ("finished", ""),
        "crash": ("failed", "exit code 1"),
        "hang": ("failed", "hung: no progress for 3s"),
        "nan": ("failed", "non-finite loss at step 4"),
        "nan_exit": ("failed", "non-finite loss"),
        "ok_b": ("finished", ""),
    }
    assert results["nan_exit"].exit_code == 3
    assert (tmp_path / "ok_a" / "done").exists() and (tmp_path / "ok_b" / "done").exists()
    assert not (tmp_path / "nan" / "done").exists()  # stopped long before its 500 steps
    assert "crashing at step 3" in (tmp_path / "crash" / "launcher.log").read_text()
    for name in ("hang", "nan"):  # nothing of a stopped job survives
        rec = [r for r in Journal(journal_path).records() if r.candidate == name][1]
        assert group_members(rec.pgid, started_since=rec.start_ticks) == []


def test_hang_ignoring_sigterm_gets_its_grace_then_sigkill(tmp_path, journal_path):
    jobs = [ft.job(tmp_path, "stubborn", steps=10, mode="hang", fail_at=2, ignore_sigterm=True)]
    t0 = time.monotonic()
    # The hang timeout leaves the fake trainer time to start and ignore SIGTERM even on a
    # loaded box (a 0.5 s timeout killed it during its own start-up, before it ignored anything).
    results = _run(jobs, journal_path, hang_timeout_s=3.0, kill_grace_s=1.0)
    elapsed = time.monotonic() - t0
    assert (results["stubborn"].state, results["stubborn"].reason.split(";")[0]) == (
        "failed", "hung: no progress for 3s")
    # The wrapper died of SIGTERM at once, but the trainer (ignoring it) had its full grace
    # period before the SIGKILL, and is gone now.
    assert elapsed >= 3.0 + 1.0
    rec = [r for r in Journal(journal_path).records() if r.state == "running"][0]
    assert group_members(rec.pgid, started_since=rec.start_ticks) == []  # zombies don't count


def test_retries(tmp_path, journal_path):
    jobs = [
        # transient: crashes on its first launch only, then resumes from its checkpoint
        ft.job(tmp_path, "flaky", steps=10, eval_interval=5, mode="crash", fail_at=5,
               only_first_launch=True),
        ft.job(tmp_path, "broken", steps=10, mode="crash", fail_at=1),
        ft.job(tmp_path, "diverges", steps=10, mode="nan-exit", fail_at=1),
    ]
    results = _run(jobs, journal_path, max_retries=2)
    assert (results["flaky"].state, results["flaky"].attempt) == ("finished", 2)
    assert (results["broken"].state, results["broken"].attempt) == ("failed", 3)
    assert results["broken"].reason == "exit code 1"
    # a non-finite loss is deterministic: never retried
    assert (results["diverges"].state, results["diverges"].attempt) == ("failed", 1)
    assert [len(ft.launches(tmp_path / n)) for n in ("flaky", "broken", "diverges")] == [2, 3, 1]
    assert load_curve(tmp_path / "flaky" / "metrics.jsonl").steps.tolist() == [0, 5, 10]
    flaky = [(r.state, r.attempt, r.reason) for r in Journal(journal_path).records()
             if r.candidate == "flaky"]
    assert ("pending", 2, "retry after: exit code 1") in flaky
    assert flaky[-1] == ("finished", 2, "")


def test_rerun_with_finished_journal_launches_nothing(tmp_path, journal_path):
    jobs = [ft.job(tmp_path, "a", steps=3), ft.job(tmp_path, "b", steps=3, mode="crash", fail_at=1)]
    first = _run(jobs, journal_path)
    second = _run(jobs, journal_path)
    assert first == second
    assert [len(ft.launches(tmp_path / n)) for n in "ab"] == [1, 1]


def test_progress_lines_and_table(tmp_path, journal_path):
    out = io.StringIO()
    jobs = [ft.job(tmp_path, "a", steps=5, sleep_per_step=0.02),
            ft.job(tmp_path, "b", steps=5, mode="crash", fail_at=1)]
    _run(jobs, journal_path, num_slots=1, progress=ProgressReporter(out, tty=False))
    text = out.getvalue()
    assert "a: running attempt 1" in text and "b: waiting attempt 1" in text
    assert "b: failed attempt 1 (exit code 1)" in text and "a: finished attempt 1" in text

    rows = [ProgressRow(name="dup_last", state="running", attempt=1, steps_done=40,
                        last_step=300040, last_val_loss=2.5),
            ProgressRow(name="rand", state="failed", attempt=2, reason="exit code 1")]
    table = format_table(rows)
    assert table[0] == "candidates: 1 running, 1 failed"
    assert table[2].split() == ["dup_last", "running", "1", "40", "300040", "2.5000", "-"]
    assert table[3].split() == ["rand", "failed", "2", "-", "-", "-", "-", "exit", "code", "1"]
    tty = io.StringIO()
    rep = ProgressReporter(tty, tty=True, min_interval_s=0)
    rep.update(rows)
    rep.update(rows)
    assert tty.getvalue().count("\x1b[4F\x1b[J") == 1  # second draw moves up over the first


def test_bad_arguments_and_busy_journal(tmp_path, journal_path):
    a = ft.job(tmp_path, "a", steps=1)
    with pytest.raises(ValueError, match="duplicate job names"):
        _run([a, a], journal_path)
    with pytest.raises(ValueError, match="hang_timeout_s must be > 0"):
        _run([a], journal_path, hang_timeout_s=0)
    with pytest.raises(ValueError, match="not a multiple of 2"):
        _run([a], journal_path, num_slots=3, slots_per_slice=2)
    with open(f"{journal_path}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="in use by another orchestrator"):
            _run([a], journal_path)


def test_end_to_end_launch_then_select(tmp_path, journal_path):
    # Candidates grown at step 1000: "preserve" is best at LAG@0, "dup" wins LAG@20, "rand"
    # would win outright but diverges, "oom" crashes.
    base = 1000
    common = dict(steps=20, start_step=base, eval_interval=5)
    jobs = [ft.job(tmp_path, "preserve", loss0=3.0, loss_slope=0.001, **common),
            ft.job(tmp_path, "dup", loss0=3.2, loss_slope=0.02, **common),
            ft.job(tmp_path, "rand", loss0=3.3, loss_slope=0.05, mode="nan", fail_at=10,
                   sleep_per_step=0.02, **common),
            ft.job(tmp_path, "oom", loss0=2.0, loss_slope=0.05, mode="crash", fail_at=3, **common)]
    results = _run(jobs, journal_path)
    failed = {n: r.reason for n, r in results.items() if r.state == "failed"}
    assert failed == {"rand": "non-finite loss at step 1010", "oom": "exit code 1"}
    curves = {j.name: load_curve(j.metrics_path) for j in jobs if j.name not in failed}
    sel = select_lag(curves, k=20, base_step=base, failed=failed)
    assert (sel.winner, sel.lag0_winner) == ("dup", "preserve")
    assert sel.ranking[0].lag_k_loss == pytest.approx(3.2 - 0.02 * 20)
    assert sel.excluded == {"rand": "failed: non-finite loss at step 1010",
                            "oom": "failed: exit code 1"}


def test_non_tty_heartbeat_repeats_running_jobs_only():
    out = io.StringIO()
    rep = ProgressReporter(out, tty=False, heartbeat_s=0.0)
    rows = [ProgressRow(name="a", state="running", attempt=1, steps_done=3, last_step=13, last_val_loss=2.0),
            ProgressRow(name="b", state="finished", attempt=1)]
    rep.update(rows)
    rep.update(rows)
    lines = out.getvalue().splitlines()
    assert sum("a: running" in line for line in lines) == 2  # repeated as a heartbeat
    assert sum("b: finished" in line for line in lines) == 1  # unchanged non-running state: once
    assert "a: running attempt 1 step 13 val/loss 2.0000" in lines[-2]
    assert lines[-1].endswith("] 1 running, 1 finished")  # the phase's counts
    quiet = io.StringIO()
    rep = ProgressReporter(quiet, tty=False, heartbeat_s=3600)
    rep.update(rows)
    rep.update(rows)
    assert quiet.getvalue().count("a: running") == 1


def test_running_line_says_step_of_total_losses_speed_and_eta_or_the_status_line():
    row = ProgressRow(name="base", state="running", attempt=1, steps_done=120, last_step=120,
                      total_step=300, train_loss=5.1234, last_val_loss=5.08, tokens_per_s=4800.4,
                      eta_s=70)
    assert describe_running(row) == ("step 120/300 (40%) loss 5.1234 val/loss 5.0800 "
                                     "4,800 tok/s ETA 1m10s")
    starting = ProgressRow(name="base", state="running", attempt=1, status="preparing data")
    assert describe_running(starting) == "starting: preparing data"
    assert format_table([starting])[2].split()[-3:] == ["starting:", "preparing", "data"]
    assert [format_duration(s) for s in (None, 5, 75, 3725)] == ["?", "5s", "1m15s", "1h02m"]


def test_status_line_is_the_newest_prefixed_line_of_the_log(tmp_path):
    log = tmp_path / "launcher.log"
    assert last_status_line(log, "[x]") is None  # no log yet
    log.write_text("noise\n[x] preparing data\n[INFO] deepspeed\r 10%|#  |\r[x] loading ckpt\r"
                   "50%|\n")
    assert last_status_line(log, "[x]") == "loading ckpt"


def test_watcher_measures_speed_from_wall_time_and_phase_eta_counts_waves(tmp_path, journal_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 10, "wall_time": 100.0, "val/loss": 3.0},
        {"step": 11, "wall_time": 101.0, "train/loss": 2.9, "train/tokens_per_s": 512.0},
        {"step": 15, "wall_time": 103.0, "train/loss": 2.5}]))
    w = MetricsWatcher(path)
    w._since = 0.0  # records "written" at t=100..103 (the epoch), after the watch began
    w.poll()
    assert w.steps_per_s == pytest.approx(2.0) and w.last_train_loss == 2.5
    stale = MetricsWatcher(path)  # the same records, written before this watch began
    stale.poll()
    assert stale.steps_per_s is None and stale.last_train_loss == 2.5
    assert w.last_tokens_per_s == 512.0 and w.last_val_step == 10
    # A real run: 3 jobs of 4 steps, 1 slot -> the ETA shown drops to 0 and the output shows
    # step/total for the running job.
    out = io.StringIO()
    jobs = [dataclasses.replace(ft.job(tmp_path, n, steps=4, sleep_per_step=0.3), total_steps=4)
            for n in "abc"]
    _run(jobs, journal_path, num_slots=1,
         progress=ProgressReporter(out, tty=False, heartbeat_s=0.0))
    text = out.getvalue()
    assert "/4 (" in text and "ETA " in text and "all done in ~" in text
