"""Landscape analysis, k proposals and the strategy table on hand-computed examples."""

import math
from dataclasses import asdict

import numpy as np
import pytest

from lag_ds.growth.space import (
    paper_ul2_space,
    stack_last_block_on_top,
    stack_random_block_on_top,
)
from lag_ds.select import Curve
from lag_ds.select.landscape import loss_table, self_correlation, smooth_centred, step_stats
from lag_ds.select.phase import propose_k_from_final, propose_k_from_self
from lag_ds.select.policies import PolicyOutcome
from lag_ds.select.strategies import on_top_operators, strategy_table

BASE = 500
NAN = math.nan


def _curve(name, points):
    return Curve(name=name, steps=np.array([BASE + s for s, _ in points]),
                 values=np.array([v for _, v in points], dtype=float))


def _hand_pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    vx = sum((a - mx) ** 2 for a in x)
    vy = sum((b - my) ** 2 for b in y)
    return cov / math.sqrt(vx * vy)


def test_smooth_centred_truncates_at_the_ends():
    assert smooth_centred(np.array([1.0, 2, 3, 4, 5]), 3).tolist() == [1.5, 2, 3, 4, 4.5]
    assert smooth_centred(np.array([1.0, 2, 9]), 5).tolist() == [4.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="odd"):
        smooth_centred(np.array([1.0]), 4)


def test_loss_table_excludes_nan_curves_and_marks_missing_points():
    curves = {
        "a": _curve("a", [(-10, 9.0), (0, 3.0), (10, 2.0), (20, 1.0)]),   # pre-growth point dropped
        "b": _curve("b", [(0, 3.5), (20, 1.5)]),                           # no point at t=10
        "c": _curve("c", [(0, 3.0), (10, NAN), (20, 1.0)]),
        "d": _curve("d", [(-10, 5.0)]),
    }
    table = loss_table(curves, base_step=BASE)
    assert table.steps.tolist() == [0, 10, 20]
    assert table.names == ("a", "b")
    assert "non-finite loss at step 510 (t=10)" in table.excluded["c"]
    assert "no validation point" in table.excluded["d"]
    assert table.at(1) == {"a": 2.0}
    smoothed = loss_table(curves, base_step=BASE, smoothing_window=3)
    # "b" is smoothed over its own points: (3.5 + 1.5) / 2 at both ends
    assert smoothed.at(0) == {"a": 2.5, "b": 2.5}
    assert smoothed.at(2) == {"a": 1.5, "b": 2.5}


def test_step_stats_hand_computed():
    curves = {
        "a": _curve("a", [(0, 1.0), (10, 3.0), (20, 2.0)]),
        "b": _curve("b", [(0, 2.0), (10, 2.5), (20, 2.0)]),   # tie with "a" at t=20
        "c": _curve("c", [(0, 3.0), (10, 1.0), (20, 2.0)]),
    }
    finals = {"a": 3.0, "b": 2.0, "c": 1.0}
    s0, s10, s20 = step_stats(loss_table(curves, base_step=BASE), final_losses=finals)
    assert s0.spearman_final == pytest.approx(-1.0)
    assert s0.pearson_final == pytest.approx(-1.0)
    assert (s0.pick, s0.regret, s0.relative_regret) == ("a", 2.0, 1.0)
    assert s0.recall == {1: False, 2: False, 3: True}
    assert s10.spearman_final == pytest.approx(1.0)
    assert s10.pearson_final == pytest.approx(_hand_pearson([3.0, 2.5, 1.0], [3.0, 2.0, 1.0]))
    assert (s10.pick, s10.regret, s10.recall) == ("c", 0.0, {1: True, 2: True, 3: True})
    # constant losses at t=20: correlation undefined (None), pick by name
    assert s20.spearman_final is None and s20.pearson_final is None
    assert (s20.pick, s20.regret, s20.relative_regret) == ("a", 2.0, 1.0)


def test_step_stats_missing_point_one_candidate_and_no_finals():
    curves = {
        "a": _curve("a", [(0, 1.0), (10, 1.0)]),
        "b": _curve("b", [(0, 2.0)]),           # ends early: no final, no point at t=10
        "c": _curve("c", [(0, 3.0), (10, 0.5)]),
    }
    table = loss_table(curves, base_step=BASE)
    s0, s10 = step_stats(table, final_losses={"a": 1.0})   # one judged candidate
    assert (s0.num_candidates, s0.pick, s0.spearman_final, s0.regret) == (1, "a", None, 0.0)
    assert s0.recall == {1: True, 2: True, 3: True}
    race = step_stats(table)                                # no finals: pick only
    assert [(s.t, s.num_candidates, s.pick) for s in race] == [(0, 3, "a"), (10, 2, "c")]
    assert race[0].spearman_final is None and race[0].recall is None
    # the final-best without a point at t -> recall undefined there
    s0, s10 = step_stats(table, final_losses={"b": 0.1, "a": 1.0, "c": 2.0})
    assert s0.recall == {1: False, 2: True, 3: True}   # b is 2nd at t=0
    assert s10.recall == {1: None, 2: None, 3: None}
    with pytest.raises(ValueError, match="non-finite final"):
        step_stats(table, final_losses={"a": NAN})


def test_self_correlation_vectorised_and_pairwise_agree():
    rows = [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 4.0, 3.0], [4.0, 3.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0]]
    curves = {n: _curve(n, [(10 * i, rows[i][j]) for i in range(4)]) for j, n in enumerate("abcd")}
    m = self_correlation(loss_table(curves, base_step=BASE))
    assert m[0, 1] == pytest.approx(0.8)    # 1 - 6*2/(4*15)
    assert m[0, 2] == pytest.approx(-1.0)
    assert m[1, 2] == pytest.approx(-0.8)
    assert np.isnan(m[3]).all() and np.isnan(m[:, 3]).all()   # constant step: undefined
    assert m[0, 0] == pytest.approx(1.0)
    # one missing point forces the pairwise path; entries over the 3 common candidates
    curves["d"] = _curve("d", [(0, 4.0), (20, 1.0), (30, 5.0)])
    m2 = self_correlation(loss_table(curves, base_step=BASE))
    assert m2[0, 2] == pytest.approx(-1.0)
    assert m2[0, 1] == pytest.approx(1.0)   # a, b, c only: 1,2,3 vs 1,2,4
    single = {"a": _curve("a", [(0, 1.0), (10, 2.0)])}
    assert np.isnan(self_correlation(loss_table(single, base_step=BASE))).all()


def test_propose_k_from_final():
    p = propose_k_from_final([0, 10, 20, 30, 40], [-0.5, 0.95, 0.5, 0.92, 1.0])
    assert (p.transition, p.k, p.covered) == (30, 60, False)
    p = propose_k_from_final([0, 10, 25, 50, 65, 80], [-0.5, 0.5, 0.95, 0.95, 0.95, 1.0])
    assert (p.transition, p.k, p.covered) == (25, 50, True)
    p = propose_k_from_final([0, 10, 25, 50, 65, 80], [-0.5, 0.5, 0.95, 0.95, 0.95, 1.0],
                             margin=2.2)
    assert (p.transition, p.k) == (25, 65)          # 55 rounded up to the next evaluated step
    p = propose_k_from_final([0, 10], [0.95, None])
    assert (p.transition, p.k) == (None, None) and "no k proposed" in p.describe()
    assert "t=25" in propose_k_from_final([25], [1.0]).describe()
    with pytest.raises(ValueError, match="threshold"):
        propose_k_from_final([0], [1.0], threshold=2)


def test_propose_k_from_self():
    m = np.array([
        [1.0, 0.2, 0.3, 0.1],
        [0.2, 1.0, 0.95, 0.85],
        [0.3, 0.95, 1.0, 0.93],
        [0.1, 0.85, 0.93, 1.0],
    ])
    p = propose_k_from_self([0, 10, 20, 30], m)
    assert (p.rule, p.transition, p.k, p.covered) == ("self-correlation", 20, 40, False)
    p = propose_k_from_self([0, 10, 20, 30], m, threshold=0.8, margin=3)
    assert (p.transition, p.k) == (10, 30)
    m[2, 3] = m[3, 2] = NAN
    assert propose_k_from_self([0, 10, 20, 30], m).transition is None


def test_on_top_operators_match_the_growth_space():
    ops = {op.name: asdict(op) for op in paper_ul2_space()}
    assert on_top_operators(ops, base_num_layers=12) == {
        "last": stack_last_block_on_top(12, 4).name,
        "random": stack_random_block_on_top(12, 4).name,
    }
    assert on_top_operators({k: v for k, v in ops.items() if v["start"] == 0},
                            base_num_layers=12) == {}
    with pytest.raises(ValueError, match="lacks"):
        on_top_operators({"x": {"start": 1}}, base_num_layers=12)


def test_strategy_table_reproduces_paper_table_2_numbers():
    finals = {"oracle": 2.1254, "lag": 2.1268, "init": 2.1398, "last": 2.1357, "worst": 2.1410}
    sh = PolicyOutcome(policy="SH(eta=3,r0=10,k=40)", pick="gone", decided_at=30,
                       candidate_steps=150, regret=None, relative_regret=None)
    rows = strategy_table(finals, final_t=100_000, num_candidates=5, lag_k=2000, lag_pick="lag",
                          lag0_pick="init", on_top={"last": "last", "random": "init"},
                          replays=[sh])
    by = {r.strategy: r for r in rows}
    assert list(by) == ["Oracle", "LAG@2000", "Best at initialization (LAG@0)",
                        "Stack last block on top", "Stack random block on top",
                        "SH(eta=3,r0=10,k=40)"]
    spread = 2.1410 - 2.1254
    assert (by["Oracle"].regret, by["Oracle"].candidate_steps) == (0.0, 500_000)
    assert by["LAG@2000"].regret == pytest.approx(0.0014)
    assert by["LAG@2000"].relative_regret == pytest.approx(0.0014 / spread)
    assert by["LAG@2000"].candidate_steps == 10_000
    assert by["Stack last block on top"].relative_regret == pytest.approx(0.0103 / spread)
    assert by["Stack random block on top"].final_loss == 2.1398
    assert by["SH(eta=3,r0=10,k=40)"].regret is None
    assert "gone has no final loss" in by["SH(eta=3,r0=10,k=40)"].note
