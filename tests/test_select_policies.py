"""Race policies (SH, settle) and their replay on curves: hand-computed answers."""

import math

import numpy as np
import pytest

from lag_ds.select import Curve, NoEligibleCandidate
from lag_ds.select.policies import (
    PolicyOutcome,
    replay_lag,
    replay_settle,
    replay_sh,
    settle_step,
    sh_keep,
    sh_rungs,
)

BASE = 1000
NAN = math.nan


def _curve(name, values, *, every=10):
    steps = [BASE + every * i for i in range(len(values))]
    return Curve(name=name, steps=np.array(steps), values=np.array(values, dtype=float))


@pytest.mark.parametrize("k, r0, eta, want", [
    (40, 10, 3, (10, 30, 40)),
    (40, 40, 3, (40,)),            # r0 == k: one rung, the decision itself
    (30, 10, 3, (10, 30)),         # eta * r0 == k: k is not repeated
    (100, 10, 2, (10, 20, 40, 80, 100)),
    (1, 1, 2, (1,)),
    (41, 10, 2, (10, 20, 40, 41)),
])
def test_sh_rungs(k, r0, eta, want):
    assert sh_rungs(k, min_steps=r0, eta=eta) == want


@pytest.mark.parametrize("k, r0, eta, word", [
    (0, 1, 2, "k"), (10, 0, 2, "min_steps"), (10, 1, 1, "eta"), (10, 11, 2, "min_steps=11"),
    (10, 2.0, 2, "min_steps"),
])
def test_sh_rungs_errors(k, r0, eta, word):
    with pytest.raises(ValueError, match=word):
        sh_rungs(k, min_steps=r0, eta=eta)


def test_sh_keep_ties_broken_by_name():
    assert sh_keep({"b": 1.0, "a": 1.0, "c": 2.0}, eta=2) == ("a", "b")  # ceil(3/2) = 2
    assert sh_keep({"b": 1.0, "a": 1.0, "c": 2.0}, eta=3) == ("a",)      # ceil(3/3) = 1


def test_sh_keep_non_finite_never_survive_but_count_in_n():
    # n = 4 -> keep ceil(4/2) = 2, but only one is finite.
    assert sh_keep({"a": NAN, "b": math.inf, "c": 5.0, "d": NAN}, eta=2) == ("c",)
    assert sh_keep({"a": NAN, "b": NAN}, eta=2) == ()
    # n = 5, eta = 2 -> 3 survive, sorted by loss
    assert sh_keep({"a": 5, "b": 4, "c": 3, "d": 2, "e": NAN}, eta=2) == ("d", "c", "b")


def test_sh_keep_one_candidate_and_errors():
    assert sh_keep({"x": 1.0}, eta=3) == ("x",)
    with pytest.raises(ValueError, match="empty"):
        sh_keep({}, eta=2)
    with pytest.raises(ValueError, match="eta"):
        sh_keep({"x": 1.0}, eta=1)


# Ranks per evaluation (lower loss first).  From t=30 on the order is a<b<c<d for good; at t=20
# c and d are swapped: Spearman(t=20, t=30) = 1 - 6*2/(4*15) = 0.8.
FLIP = {
    0: {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0},
    10: {"a": 2.0, "b": 4.0, "c": 1.0, "d": 3.0},
    20: {"a": 1.0, "b": 2.0, "c": 4.0, "d": 3.0},
    30: {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0},
    40: {"a": 0.9, "b": 1.9, "c": 2.9, "d": 3.9},
    50: {"a": 0.8, "b": 1.8, "c": 2.8, "d": 3.8},
    60: {"a": 0.7, "b": 1.7, "c": 2.7, "d": 3.7},
}


@pytest.mark.parametrize("tau, m, floor, cap, want", [
    (0.9, 1, 0, 100, 40),    # pair (30, 40) is the first with rho >= 0.9
    (0.9, 2, 0, 100, 50),    # pairs (30,40), (40,50)
    (0.9, 1, 45, 100, 50),   # settled since 40, but not before floor
    (0.8, 1, 0, 100, 30),    # rho(20, 30) = 0.8 is enough for tau = 0.8
    (0.9, 2, 0, 35, 35),     # not settled at 40 (one pair only) but 40 >= cap: decide at cap
    (0.9, 3, 0, 60, 60),     # settles exactly at 60 == cap
    (0.9, 4, 0, 100, None),  # would need (30..70): keep training
])
def test_settle_step_known_answers(tau, m, floor, cap, want):
    assert settle_step(FLIP, tau=tau, m=m, floor=floor, cap=cap) == want


def test_settle_step_constant_losses_never_settle():
    const = {t: {"a": 1.0, "b": 1.0, "c": 1.0} for t in range(0, 50, 10)}
    assert settle_step(const, tau=0.0, m=1, floor=0, cap=100) is None
    assert settle_step(const, tau=0.0, m=1, floor=0, cap=30) == 30


def test_settle_step_drops_candidates_missing_or_nan():
    # "x" disagrees with everything but is NaN at 10 and missing at 20: it stops counting at 10.
    by_step = {
        0: {"a": 1.0, "b": 2.0, "c": 3.0, "x": 0.0},
        10: {"a": 1.0, "b": 2.0, "c": 3.0, "x": NAN},
        20: {"a": 1.0, "b": 2.0, "c": 3.0},
    }
    assert settle_step(by_step, tau=1.0, m=1, floor=0, cap=100) == 10
    # one candidate left: correlation undefined -> not settled, decided at cap only
    single = {0: {"a": 1.0}, 10: {"a": 0.5}, 20: {"a": 0.4}}
    assert settle_step(single, tau=0.5, m=1, floor=0, cap=20) == 20


@pytest.mark.parametrize("kw, word", [
    ({"tau": 1.5}, "tau"), ({"m": 0}, "m"), ({"floor": -1}, "floor"), ({"cap": 5, "floor": 10},
                                                                        "cap"),
])
def test_settle_step_errors(kw, word):
    args = {"tau": 0.9, "m": 1, "floor": 0, "cap": 100} | kw
    with pytest.raises(ValueError, match=word):
        settle_step(FLIP, **args)


def _curves(table):
    return {n: _curve(n, vals) for n, vals in table.items()}


def test_replay_lag_cost_and_regret_and_nan_after_k_is_unseen():
    curves = _curves({
        "a": [3.0, 2.0, 1.5, 1.0, 0.9, NAN],   # best at k=40 (t=40 -> index 4); NaN later
        "b": [2.0, 1.8, 1.7, 1.6, 1.5, 1.4],
        "c": [2.5, 2.4, 2.3, 2.2, 2.1, 2.0],
    })
    final = {"b": 1.4, "c": 2.0, "d": 1.2}
    out = replay_lag(curves, base_step=BASE, k=40, final_losses=final)
    assert out == PolicyOutcome(policy="LAG@40", pick="a", decided_at=40, candidate_steps=120,
                                regret=None, relative_regret=None)  # "a" has no final loss
    out0 = replay_lag(curves, base_step=BASE, k=0, final_losses=final)
    assert (out0.pick, out0.candidate_steps) == ("b", 0)
    assert out0.regret == pytest.approx(0.2)
    assert out0.relative_regret == pytest.approx(0.2 / 0.8)
    assert replay_lag(curves, base_step=BASE, k=20).pick == "a"  # 1.5 < 1.7
    out_w = replay_lag(curves, base_step=BASE, k=20, smoothing_window=3)
    assert out_w.policy == "LAG@20(w=3)" and out_w.pick == "b"  # (2+1.8+1.7)/3 < (3+2+1.5)/3


def _nine():
    # losses at t = 0, 10, 20, 30, 40; candidate i has a constant offset except "c8" which is
    # worst at t=10 (eliminated) and would be best later.
    table = {f"c{i}": [5.0 + i - 0.1 * j for j in range(5)] for i in range(8)}
    table["c8"] = [9.0, 99.0, 0.0, 0.0, 0.0]
    return _curves(table)


def test_replay_sh_decides_early_when_one_survivor():
    curves = _nine()
    final = {n: float(c.values[-1]) for n, c in curves.items()}
    out = replay_sh(curves, base_step=BASE, k=40, min_steps=10, eta=3, final_losses=final)
    # rung 10: 9 trained 10 steps, keep ceil(9/3)=3 (c0,c1,c2); rung 30: 3 trained 20 more,
    # keep 1 -> decided at 30.  9*10 + 3*20 = 150.
    assert (out.pick, out.decided_at, out.candidate_steps) == ("c0", 30, 150)
    assert out.policy == "SH(eta=3,r0=10,k=40)"
    assert out.regret == pytest.approx(final["c0"] - 0.0)
    assert out.relative_regret == pytest.approx((final["c0"] - 0.0) / (final["c7"] - 0.0))


def test_replay_sh_reaches_k():
    curves = _curves({n: [v] * 4 for n, v in zip("abcde", [5.0, 4.0, 3.0, 2.0, 1.0])})
    out = replay_sh(curves, base_step=BASE, k=30, min_steps=10, eta=2)
    # rungs 10, 20, 30: 5*10 + 3*10 + 2*10 = 100 (5 -> 3 -> 2 -> pick)
    assert (out.pick, out.decided_at, out.candidate_steps) == ("e", 30, 100)
    assert out.regret is None


def test_replay_sh_nan_before_rung_is_eliminated_and_all_nan_raises():
    curves = _curves({"a": [1.0, NAN, 0.1, 0.1], "b": [2.0, 1.0, 0.5, 0.5]})
    out = replay_sh(curves, base_step=BASE, k=30, min_steps=20, eta=2)
    assert out.pick == "b"  # "a" is lowest at t=20 but was NaN at t=10
    bad = _curves({"a": [1.0, NAN], "b": [1.0, NAN]})
    with pytest.raises(NoEligibleCandidate):
        replay_sh(bad, base_step=BASE, k=10, min_steps=10, eta=2)


def test_replay_settle_pick_and_cost():
    curves = {n: _curve(n, [FLIP[t][n] for t in sorted(FLIP)]) for n in "abcd"}
    final = {n: FLIP[60][n] for n in "abcd"}
    out = replay_settle(curves, base_step=BASE, tau=0.9, m=2, floor=0, cap=100,
                        final_losses=final)
    assert (out.pick, out.decided_at, out.candidate_steps) == ("a", 50, 200)
    assert out.policy == "settle(tau=0.9,m=2)"
    assert out.regret == 0.0 and out.relative_regret == 0.0
    capped = replay_settle(curves, base_step=BASE, tau=0.9, m=1, floor=0, cap=15)
    # first evaluation >= 15 is t=20, where "a" is lowest; cost 4 * 15
    assert (capped.pick, capped.decided_at, capped.candidate_steps) == ("a", 15, 60)
    with pytest.raises(ValueError, match="before the ranking settled"):
        replay_settle(curves, base_step=BASE, tau=0.9, m=6, floor=0, cap=100)


def test_replay_rejects_misnamed_or_empty_curves():
    with pytest.raises(ValueError, match="no curves"):
        replay_sh({}, base_step=BASE, k=10, min_steps=10, eta=2)
    with pytest.raises(ValueError, match="named"):
        replay_lag({"x": _curve("y", [1.0])}, base_step=BASE, k=0)


def test_sh_trained_steps_per_candidate():
    from lag_ds.select.policies import sh_trained_steps

    pick, trained = sh_trained_steps(_nine(), base_step=BASE, k=40, min_steps=10, eta=3)
    # c3..c8 eliminated at rung 10, c1 and c2 at rung 30, c0 decided at 30
    assert pick == "c0"
    assert trained == {**{f"c{i}": 10 for i in range(3, 9)}, "c1": 30, "c2": 30, "c0": 30}
    assert sum(trained.values()) == 150


def test_numpy_scalars_are_numbers():
    assert sh_keep({"a": np.float32(2.0), "b": np.float64(1.0), "c": np.float32("nan")},
                   eta=2) == ("b", "a")


def test_settle_pairs_use_the_candidates_that_count_at_t():
    # "x" flips the ranking between t=0 and t=10, then drops out (missing at t=20).  At t=20 only
    # a, b, c count, and over them both pairs (0,10), (10,20) are perfectly correlated.
    by_step = {
        0: {"a": 1.0, "b": 2.0, "c": 3.0, "x": 0.0},
        10: {"a": 1.0, "b": 2.0, "c": 3.0, "x": 9.0},
        20: {"a": 1.0, "b": 2.0, "c": 3.0},
    }
    # over a, b, c, x: ranks 2,3,4,1 vs 1,2,3,4 -> rho(0, 10) = 1 - 6*12/60 = -0.2
    assert settle_step(by_step, tau=0.9, m=1, floor=0, cap=100) == 20
    assert settle_step(by_step, tau=0.9, m=2, floor=0, cap=100) == 20


@pytest.mark.parametrize("w", [1, 2, 3])
def test_lag_at_every_step_equals_replay_lag_per_step(w):
    from lag_ds.select.policies import lag_at_every_step

    rng = np.random.default_rng(7)
    curves = {
        "a": _curve("a", list(rng.random(12))),
        "b": _curve("b", [*rng.random(5), NAN, *rng.random(6)]),       # diverges at t=50
        "c": Curve(name="c", steps=np.array([BASE + 20 * i for i in range(6)]),
                   values=rng.random(6)),                               # every other point
        "d": _curve("d", [0.5] * 12),                                    # ties with rounding
        "e": _curve("e", [0.5] * 12),
    }
    final = {"a": 1.0, "c": 2.0, "d": 0.5}
    fast = lag_at_every_step(curves, base_step=BASE, smoothing_window=w, final_losses=final)
    assert sorted(fast) == [10 * i for i in range(12)]
    for t, out in fast.items():
        assert out == replay_lag(curves, base_step=BASE, k=t, smoothing_window=w,
                                 final_losses=final)
