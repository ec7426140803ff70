"""Stage schedules: parsing, validation with one-line errors naming the stage, plans and costs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

from lag_ds.stacking.schedule import load_schedule, plan_schedule, with_baseline

GOOD = """train_config: launch_scripts/configs/tiny_base.yaml
initial_layers: 2
stages:
  - {steps: 10}
  - {steps: 8, num_new_layers: 1, k: 3, space: "starts0=0,1;blocks=1;inits=duplicate,random"}
  - {steps: 8, num_new_layers: 2, k: 3, fixed: last}
"""


def write(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_plan_layers_steps_operators_and_costs(tmp_path):
    plans = plan_schedule(load_schedule(write(tmp_path, GOOD)))
    assert [(p.layers_before, p.layers_after) for p in plans] == [(0, 2), (2, 3), (3, 5)]
    assert [(p.start_step, p.end_step) for p in plans] == [(0, 10), (10, 18), (18, 26)]
    assert [op.name for op in plans[1].operators] == [
        "k1-i0-b1-duplicate", "k1-i0-b1-random", "k1-i1-b1-duplicate", "k1-i1-b1-random"]
    assert plans[1].candidate_steps == 4 * 3
    assert [op.name for op in plans[2].operators] == ["k2-i1-b2-duplicate"]  # last 2 on top
    assert plans[2].fixed and plans[2].candidate_steps == 0
    last = plan_schedule(with_baseline(load_schedule(write(tmp_path, GOOD)), "last"))
    assert [op.name for p in last[1:] for op in p.operators] == [
        "k1-i1-b1-duplicate", "k2-i1-b2-duplicate"]
    assert [p.end_step for p in last] == [p.end_step for p in plans]  # same budget


@pytest.mark.parametrize("bad, message", [
    ("  - {steps: 8, num_new_layers: 1, k: 3}", "stage 2: give exactly one of 'space'"),
    ("  - {steps: 8, num_new_layers: 1, k: 8, fixed: last}", "stage 2: k must be in 1..steps-1"),
    ("  - {steps: 8, num_new_layers: 0, k: 3, fixed: last}", "stage 2: num_new_layers must be"),
    ("  - {steps: 8, num_new_layers: 1, k: 3, space: 'starts0=5;blocks=1;inits=duplicate'}",
     "stage 2 (2 -> 3 layers): "),
    ("  - {steps: 8, num_new_layers: 1, k: 3, fixed: last, policy: halving}",
     "stage 2: policy must be one of"),
    ("  - {steps: 8, num_new_layers: 1, kk: 3, fixed: last}", "stage 2: unknown key(s) ['kk']"),
    ("  - [8, 1]", "stage 2: expected a mapping"),
])
def test_bad_stages_are_one_line_errors_naming_the_stage(tmp_path, bad, message):
    text = GOOD.split("  - {steps: 8, num_new_layers: 1")[0] + bad + "\n"
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as err:
        load_schedule(path)
    assert message in str(err.value) and str(path) in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "lag_ds.stacking.adaptive", "--schedule",
                           str(path), "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr


def test_first_stage_trains_from_scratch_only(tmp_path):
    path = write(tmp_path, GOOD.replace("  - {steps: 10}", "  - {steps: 10, k: 2}"))
    with pytest.raises(ValueError, match="stage 1: the first stage trains 2 layers from scratch"):
        load_schedule(path)


def test_paper_schedules_dry_run_with_their_cost():
    proc = subprocess.run([sys.executable, "-m", "lag_ds.stacking.adaptive", "--schedule",
                           "launch_scripts/configs/stacking/bert_large_paper.yaml", "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # Appendix A.3: 3 + 15 + 27 + 21 + 27 operators x LAG@200; 24 layers after 1,000,000 steps.
    assert ("total: 1,000,000 steps of the model, final depth 24; races: 18,600 "
            "candidate-steps") in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines()[1:7]]
    assert [r[3] for r in rows] == ["-", "3", "15", "27", "21", "27"]
