"""Race policies with the fake trainer: SH rungs, survivors, stopped jobs, resume after SIGKILL,
and the live "settle" rule agreeing with its offline replay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fake_trainer as ft
import pytest

from lag_ds.launch import Allocation, Journal
from lag_ds.select import load_curve
from lag_ds.select.policies import settle_step
from lag_ds.stacking.race import RacePolicy, run_race

BASE = 100
# loss(t) = loss0 - slope * t, t = steps since growing.  At the SH rungs (3, 6, 12), eta=2:
#   t=3:  b 2.95 < c 2.96 < a 2.97 < e 2.99 < f 3.10 < d 3.297  -> keep b, c, a
#   t=6:  c 2.72 < b 2.80 < a 2.94                               -> keep c, b
#   t=12: c 2.24 < b 2.50                                        -> winner c
# f would have won at t=12 (2.20): SH stops it at the first rung, which is the price of SH.
CURVES = {"a": (3.0, 0.01), "b": (3.1, 0.05), "c": (3.2, 0.08), "d": (3.3, 0.001),
          "e": (3.05, 0.02), "f": (3.4, 0.1)}
RUN_KW = dict(allocation=Allocation.local(2), slots_per_slice=1, hang_timeout_s=60,
              poll_interval_s=0.05, launcher="direct", base_port=31200)


def make_job_factory(root: Path, sleep: float = 0.0, curves=CURVES):
    def make_job(name: str, target: int):
        loss0, slope = curves[name]
        return ft.job(root, name, steps=max(0, target - BASE), start_step=BASE, eval_interval=3,
                      loss0=loss0, loss_slope=slope, sleep_per_step=sleep)
    return make_job


def sh_policy() -> RacePolicy:
    return RacePolicy(name="sh", k=12, eta=2, min_steps=3)


def test_successive_halving_rungs_survivors_and_stopped_jobs(tmp_path):
    result = run_race(sorted(CURVES), base_step=BASE, policy=sh_policy(),
                      make_job=make_job_factory(tmp_path), journal_dir=tmp_path, run_kw=RUN_KW)
    assert result.record["rungs"] == [3, 6, 12]
    assert result.record["survivors"] == [list("abcdef"), ["a", "b", "c"], ["b", "c"]]
    assert result.record["final"] == ["b", "c"]
    assert result.stopped == {"d": 3, "e": 3, "f": 3, "a": 6}
    assert result.failed == {} and result.decision_k == 12
    assert result.trained_to == {"a": 6, "b": 12, "c": 12, "d": 3, "e": 3, "f": 3}
    assert result.candidate_steps == 6 * 3 + 3 * 3 + 2 * 6
    # The stopped jobs really ended where SH stopped them; their curves stay.
    for name, t in result.stopped.items():
        assert int(load_curve(tmp_path / name / "metrics.jsonl").steps[-1]) == BASE + t
    assert int(result.curves["c"].steps[-1]) == BASE + 12
    # One launch per round a candidate was in: a job resumes from its checkpoint each round.
    assert {n: len(ft.launches(tmp_path / n)) for n in CURVES} == {
        "a": 2, "b": 3, "c": 3, "d": 1, "e": 1, "f": 1}


DRIVER = """
import sys
sys.path[:0] = {paths!r}
from pathlib import Path
import test_stacking_race as t
from lag_ds.stacking.race import run_race
root = Path({root!r})
run_race(sorted(t.CURVES), base_step=t.BASE, policy=t.sh_policy(),
         make_job=t.make_job_factory(root, sleep=0.15), journal_dir=root, run_kw=t.RUN_KW)
"""


def test_sh_resumes_after_sigkill_mid_rung_without_duplicate_launches(tmp_path):
    here = Path(__file__).resolve().parent
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(paths=[str(here), str(here.parent)], root=str(tmp_path)))
    proc = subprocess.Popen([sys.executable, str(driver)], start_new_session=True)
    rung1 = tmp_path / "journal-race-sh-r1.jsonl"
    deadline = time.monotonic() + 120
    while not (rung1.exists() and '"running"' in rung1.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "rung 1 never started"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the orchestrator only: its jobs live on
    proc.wait()
    result = run_race(sorted(CURVES), base_step=BASE, policy=sh_policy(),
                      make_job=make_job_factory(tmp_path, sleep=0.15), journal_dir=tmp_path,
                      run_kw=RUN_KW)
    assert result.record["survivors"] == [list("abcdef"), ["a", "b", "c"], ["b", "c"]]
    assert result.stopped == {"d": 3, "e": 3, "f": 3, "a": 6}
    assert {n: len(ft.launches(tmp_path / n)) for n in CURVES} == {
        "a": 2, "b": 3, "c": 3, "d": 1, "e": 1, "f": 1}
    # Rung 0 replayed from its journal: nothing launched again there.
    r0 = Journal(tmp_path / "journal-race-sh-r0.jsonl").records()
    assert sum(r.state == "running" for r in r0) == 6
    # No candidate trained past its rung: metrics end exactly at the rung of its last round.
    for name, t in {"a": 6, "b": 12, "c": 12, "d": 3}.items():
        steps = [json.loads(x)["step"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == BASE + t, name


def test_settle_stops_when_the_ranking_has_settled_as_its_replay_says(tmp_path):
    # y overtakes x at t=5 (3.1 - 0.03 t < 3.0 - 0.01 t), z never catches up before the cap.
    curves = {"x": (3.0, 0.01), "y": (3.1, 0.03), "z": (3.3, 0.02)}
    policy = RacePolicy(name="settle", k=30, tau=0.99, m=2, chunk=6)
    result = run_race(sorted(curves), base_step=BASE, policy=policy,
                      make_job=make_job_factory(tmp_path, curves=curves), journal_dir=tmp_path,
                      run_kw=RUN_KW)
    by_step = {}
    for name in curves:
        c = load_curve(tmp_path / name / "metrics.jsonl")
        for s, v in zip(c.steps, c.values):
            by_step.setdefault(int(s) - BASE, {})[name] = float(v)
    expected = settle_step(by_step, tau=0.99, m=2, floor=policy.settle_floor, cap=30)
    assert expected is not None and result.decision_k == expected < 30
    assert result.record["settled_at"] == expected
    trained = set(result.trained_to.values())
    assert len(trained) == 1 and min(trained) >= expected and min(trained) % 6 == 0
    assert result.candidate_steps == 3 * min(trained)


def test_policy_validation():
    with pytest.raises(ValueError, match="policy must be one of"):
        RacePolicy(name="halving", k=4)
    with pytest.raises(ValueError):
        RacePolicy(name="sh", k=4, eta=1)
    with pytest.raises(ValueError, match="floor"):
        RacePolicy(name="settle", k=4, floor=9)
    assert RacePolicy(name="sh", k=40, eta=3).r0 == 4
    assert RacePolicy(name="sh", k=40, eta=3).describe() == "SH(eta=3,r0=4,k=40)"


def test_sh_decides_at_the_rung_that_leaves_one_survivor_as_its_replay(tmp_path):
    from lag_ds.select.policies import replay_sh

    names = ["a", "b", "c"]  # eta=3: ceil(3/3)=1 survivor after the first rung
    policy = RacePolicy(name="sh", k=12, eta=3, min_steps=3)
    result = run_race(names, base_step=BASE, policy=policy, make_job=make_job_factory(tmp_path),
                      journal_dir=tmp_path, run_kw=RUN_KW)
    replay = replay_sh(result.curves, base_step=BASE, k=12, min_steps=3, eta=3)
    assert result.decision_k == replay.decided_at == 3
    assert result.candidate_steps == replay.candidate_steps == 9
    assert result.record["final"] == [replay.pick] == ["b"]
