"""benchmarks/lag_cost.py: candidate-steps and wall time from the run's own wall_time records."""

import json
import sys
from pathlib import Path

import pytest
from test_analyze_lag import SHAPES, K, _make_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lag_cost  # noqa: E402


def test_costs_hand_computed(tmp_path, capsys):
    _make_run(tmp_path)
    assert lag_cost.main([str(tmp_path), "--eta", "3", "--r0", "10"]) == 0
    out = json.loads(capsys.readouterr().out)
    pol = out["policies"]
    # Records of evaluation i (t = 10 i): train at wall i + 0.5, val at wall i + 1.0, so a
    # candidate that stops at t has trained from wall 0.5 to wall t/10 + 1.0.
    lag = pol[f"LAG@{K}"]
    assert (lag["candidate_steps"], lag["candidate_wall_s"]) == (6 * 40, 6 * 4.5)
    assert lag["max_candidate_wall_s"] == 4.5
    # SH eta=3, r0=10: rungs 10, 30, 40; 4 out at t=10 (1.5 s each), 2 trained to t=30 (3.5 s)
    # and the last of them is alone -> decided at 30.
    sh = pol["SH(eta=3,r0=10,k=40)"]
    assert (sh["candidate_steps"], sh["decided_at"]) == (4 * 10 + 2 * 30, 30)
    assert sh["candidate_wall_s"] == pytest.approx(4 * 1.5 + 2 * 3.5)
    alone = pol["winner_alone"]
    assert (alone["pick"], alone["candidate_steps"], alone["candidate_wall_s"]) == (
        lag["pick"], 40, 4.5)
    assert lag["regret"] == 0.0 and sh["relative_regret"] > 0
    assert out["sh_over_lag_candidate_steps"] == pytest.approx(100 / 240)


def test_race_only_run_is_refused(tmp_path, capsys):
    _make_run(tmp_path, last=K, names=list(SHAPES))
    assert lag_cost.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "race-only" in err
