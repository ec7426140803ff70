"""Adaptive stacking end to end (tiny preset, real launcher): 3 stages 1 -> 2 -> 3 layers, the
driver SIGKILLed mid-stage and re-run, then last stacking on the same schedule for comparison.

Checked from the outputs: the stage log, every stage's selection.json against its candidates'
curves, that no job was launched twice after the kill (journals), and TensorBoard's one curve of
the model across stages with the stage boundaries.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, deepspeed_env

from lag_ds.launch import Journal

SCHEDULE = """train_config: {train}
initial_layers: 1
eval_interval: 2
stages:
  - {{steps: 6}}
  - {{steps: 6, num_new_layers: 1, k: 2, space: "starts0=0;blocks=1;inits=duplicate,random"}}
  - {{steps: 6, num_new_layers: 1, k: 2, space: "starts0=0,1;blocks=1;inits=duplicate"}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("adaptive")
    cfg = yaml.safe_load((REPO / "launch_scripts/configs/tiny_base.yaml").read_text())
    cfg.update(cache_dir=str(root / "cache"), ds_config=str(REPO / "ds_configs/cpu_zero2.json"),
               save_interval=100)
    train = root / "tiny.yaml"
    train.write_text(yaml.safe_dump(cfg))
    schedule = root / "schedule.yaml"
    schedule.write_text(SCHEDULE.format(train=train))
    out = root / "out"
    cmd = [sys.executable, "-m", "lag_ds.stacking.adaptive", "--schedule", str(schedule),
           "--out-dir", str(out), "--baseline", "last", "--allocation", "local:2",
           "--hang-timeout-s", "240", "--base-port", "29760"]
    first = subprocess.Popen(cmd, cwd=REPO, env=deepspeed_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    journal = out / "adaptive/stage2/journal-candidates.jsonl"
    deadline = time.monotonic() + 900
    while not (journal.exists() and '"running"' in journal.read_text()):
        assert first.poll() is None, "the driver ended before stage 2's race"
        assert time.monotonic() < deadline, "stage 2's race never started"
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)  # the driver only: its jobs run on and get adopted
    first.wait()
    proc = subprocess.run(cmd, cwd=REPO, env=deepspeed_env(), capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"out": out, "stdout": proc.stdout, "stderr": proc.stderr}


def val(path: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}


def test_stage_log_and_each_stage_decision(run):
    log = json.loads((run["out"] / "adaptive/stages.json").read_text())["stages"]
    assert [(s["stage"], s["layers"], s["end_step"]) for s in log] == [(1, 1, 6), (2, 2, 12),
                                                                       (3, 3, 18)]
    for s in log[1:]:
        sel = json.loads(Path(s["selection"]).read_text())
        stage_dir = Path(s["selection"]).parent
        lag_k = {n: val(stage_dir / "candidates" / n / "run/metrics.jsonl")[sel["decision_step"]]
                 for n in s["candidates"]}
        assert s["winner"] == sel["winner"] == min(lag_k, key=lambda n: (lag_k[n], n))
        assert sel["base_step"] == log[s["stage"] - 2]["end_step"]  # grown from the last stage
        promoted = val(Path(s["run_dir"]) / "metrics.jsonl")
        assert max(promoted) == s["end_step"] and s["final_val_loss"] == promoted[s["end_step"]]


def test_no_job_launched_twice_after_the_kill(run):
    for journal in sorted((run["out"] / "adaptive").glob("stage*/journal*.jsonl")):
        runs = [r.candidate for r in Journal(journal).records() if r.state == "running"]
        assert len(runs) == len(set(runs)), (journal, runs)


def test_last_stacking_baseline_same_budget_and_side_by_side(run):
    out = run["out"]
    last = json.loads((out / "last/stages.json").read_text())["stages"]
    adaptive = json.loads((out / "adaptive/stages.json").read_text())["stages"]
    assert [s["end_step"] for s in last] == [s["end_step"] for s in adaptive]
    assert last[0]["run_dir"] == adaptive[0]["run_dir"]  # stage 1 shared
    assert [s["winner"] for s in last[1:]] == ["k1-i0-b1-duplicate", "k1-i1-b1-duplicate"]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in summary["results"]] == ["adaptive", "last"]
    for r, log in zip(summary["results"], (adaptive, last)):
        assert r["final_val_loss"] == log[-1]["final_val_loss"]
        assert f"{r['final_val_loss']:.4f}" in run["stdout"]


def test_tensorboard_one_model_curve_across_stages_with_boundaries(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run["out"] / "adaptive/tb/model"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("val/loss")]
    assert min(steps) == 0 and max(steps) == 18 and any(6 < s <= 12 for s in steps)
    assert [(e.step, e.value) for e in acc.Scalars("model/num_layers")] == [(0, 1), (6, 2),
                                                                           (12, 3)]
    stage2 = run["out"] / "adaptive/tb/stage2"
    assert {p.name for p in stage2.iterdir()} >= {"k1-i0-b1-duplicate", "k1-i0-b1-random"}
