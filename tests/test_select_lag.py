"""LAG@k selection and selection.json."""

import json
import os

import numpy as np
import pytest

from lag_ds.select import (
    Curve,
    NoEligibleCandidate,
    read_selection_json,
    select_lag,
    write_selection_json,
)

BASE = 300_000


def _curve(name, points):
    steps = [BASE + s for s, _ in points]
    return Curve(name=name, steps=np.array(steps), values=np.array([v for _, v in points]))


def _linear(name, loss0, slope, *, every=10, k=40):
    return _curve(name, [(s, loss0 - slope * s) for s in range(0, k + 1, every)])


@pytest.fixture
def curves():
    # "preserve" is best right after growing (LAG@0) but learns slowly; "dup" starts worse and
    # overtakes by step 40; "rand" is worst throughout.
    return {
        "preserve": _linear("preserve", 3.00, 0.001),
        "dup": _linear("dup", 3.20, 0.010),
        "rand": _linear("rand", 3.30, 0.002),
    }


def test_lag_k_picks_lowest_loss_at_k_and_lag0_differs(curves):
    sel = select_lag(curves, k=40, base_step=BASE)
    assert sel.winner == "dup"
    assert [r.name for r in sel.ranking] == ["dup", "preserve", "rand"]
    assert [r.rank for r in sel.ranking] == [1, 2, 3]
    assert sel.ranking[0].lag_k_loss == pytest.approx(3.20 - 0.4)
    assert sel.lag0_winner == "preserve"
    assert {r.name: r.lag_0_loss for r in sel.ranking} == {"preserve": 3.0, "dup": 3.2, "rand": 3.3}
    assert select_lag(curves, k=0, base_step=BASE).winner == "preserve"
    assert sel.decision_step == BASE + 40


def test_smoothing_changes_the_pick():
    # "spiky" has one lucky low point exactly at k; "steady" is better on average.
    spiky = _curve("spiky", [(0, 3.0), (10, 2.60), (20, 2.60), (30, 2.60), (40, 2.40)])
    steady = _curve("steady", [(0, 3.0), (10, 2.45), (20, 2.45), (30, 2.45), (40, 2.45)])
    curves = {"spiky": spiky, "steady": steady}
    assert select_lag(curves, k=40, base_step=BASE).winner == "spiky"
    sel = select_lag(curves, k=40, base_step=BASE, smoothing_window=3)
    assert sel.winner == "steady"
    assert sel.ranking[1].lag_k_loss == pytest.approx((2.6 + 2.6 + 2.4) / 3)


def test_smoothing_window_is_clipped_at_base_step():
    # A point before growing (the small model) must not enter the window.
    c = _curve("c", [(-10, 0.1), (0, 3.0), (10, 2.0)])
    sel = select_lag({"c": c}, k=10, base_step=BASE, smoothing_window=5)
    assert sel.ranking[0].lag_k_loss == pytest.approx(2.5)


def test_tie_break_is_by_name_whatever_the_input_order():
    a = _curve("b_op", [(0, 3.0), (10, 2.0)])
    b = _curve("a_op", [(0, 3.0), (10, 2.0)])
    for order in ({"b_op": a, "a_op": b}, {"a_op": b, "b_op": a}):
        sel = select_lag(order, k=10, base_step=BASE)
        assert [r.name for r in sel.ranking] == ["a_op", "b_op"]
        assert sel.lag0_winner == "a_op"


def test_nan_failed_and_missing_step_are_excluded_with_reasons(curves):
    curves = dict(curves)
    curves["diverged"] = _curve("diverged", [(0, 2.0), (10, float("nan")), (40, 1.0)])
    curves["short"] = _curve("short", [(0, 2.5), (10, 1.5)])
    sel = select_lag(curves, k=40, base_step=BASE,
                     failed={"dup": "hung: no progress for 600s", "ghost": "exit code 1"})
    assert sel.winner == "preserve"
    assert sel.excluded == {
        "diverged": f"non-finite loss at step {BASE + 10}",
        "dup": "failed: hung: no progress for 600s",
        "ghost": "failed: exit code 1",
        "short": f"no validation point at step {BASE + 40} (last step {BASE + 10})",
    }
    # LAG@0 sees only step base_step: "diverged" looked best there; failed ones never count.
    assert sel.lag0_winner == "diverged"
    assert set(sel.summaries) == {"preserve", "dup", "rand", "diverged", "short"}


def test_nothing_eligible_raises_with_every_reason():
    c = _curve("x", [(0, float("inf"))])
    with pytest.raises(NoEligibleCandidate, match=r"x: non-finite loss.*y: failed: exit code 3"):
        select_lag({"x": c}, k=0, base_step=BASE, failed={"y": "exit code 3"})


def test_bad_arguments():
    c = _curve("x", [(0, 1.0)])
    with pytest.raises(ValueError, match="k must be >= 0"):
        select_lag({"x": c}, k=-1, base_step=BASE)
    with pytest.raises(ValueError, match="smoothing_window"):
        select_lag({"x": c}, k=0, base_step=BASE, smoothing_window=0)
    with pytest.raises(ValueError, match="is named"):
        select_lag({"y": c}, k=0, base_step=BASE)


def test_selection_json_round_trip_and_no_temp_left(tmp_path, curves):
    curves = dict(curves)
    curves["diverged"] = _curve("diverged", [(0, 2.0), (10, float("nan"))])
    sel = select_lag(curves, k=40, base_step=BASE, smoothing_window=2,
                     failed={"gone": "exit code 1"})
    out = tmp_path / "lag" / "selection.json"
    write_selection_json(out, sel, data_seed=1234, extra={"design_space": "12to16"})
    assert sorted(os.listdir(out.parent)) == ["selection.json"]
    raw = json.loads(out.read_text())  # strict JSON: no NaN even for a diverged curve
    assert raw["winner"] == "dup" and raw["data_seed"] == 1234 and raw["k"] == 40
    assert raw["ranking"][0] == {"name": "dup", "rank": 1,
                                 "lag_k_loss": pytest.approx(3.2 - 0.35),
                                 "lag_0_loss": 3.2}
    assert raw["curves"]["diverged"] == {"num_points": 2, "first_step": BASE,
                                         "last_step": BASE + 10, "min_loss": 2.0,
                                         "final_loss": None, "num_non_finite": 1}
    loaded = read_selection_json(out)
    assert loaded.selection == sel
    assert loaded.data_seed == 1234 and loaded.extra == {"design_space": "12to16"}

    # Overwriting replaces atomically, still leaving only the one file.
    write_selection_json(out, select_lag(curves, k=0, base_step=BASE), data_seed=1)
    again = read_selection_json(out).selection
    assert (again.winner, again.lag0_winner, again.k) == ("preserve", "diverged", 0)
    assert sorted(os.listdir(out.parent)) == ["selection.json"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, curves, monkeypatch):
    out = tmp_path / "selection.json"
    write_selection_json(out, select_lag(curves, k=40, base_step=BASE), data_seed=7)
    before = out.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_selection_json(out, select_lag(curves, k=0, base_step=BASE), data_seed=7)
    assert out.read_bytes() == before
    assert os.listdir(tmp_path) == ["selection.json"]


@pytest.mark.parametrize("mutate, msg", [
    (lambda d: d.pop("winner"), "missing key 'winner'"),
    (lambda d: d.update(winner="rand"), "not rank 1"),
    (lambda d: d.update(version=99), "unsupported version"),
    (lambda d: d.update(decision_step=5), "decision_step"),
    (lambda d: d["ranking"][0].update(rank=2), "ranks must be"),
    (lambda d: d.update(data_seed="1"), "'data_seed' has type str"),
])
def test_read_selection_json_is_strict(tmp_path, curves, mutate, msg):
    out = tmp_path / "selection.json"
    write_selection_json(out, select_lag(curves, k=40, base_step=BASE), data_seed=7)
    d = json.loads(out.read_text())
    mutate(d)
    out.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=msg):
        read_selection_json(out)
    out.write_text('{"winner": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_selection_json(out)
