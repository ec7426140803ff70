"""Regret, relative regret, correlations and recall@k, checked against the paper's tables."""

import math

import numpy as np
import pytest

from lag_ds.select import (
    Curve,
    losses_at,
    pearson,
    rankdata,
    recall_at_k,
    regret,
    relative_regret,
    spearman,
    step_correlation,
)

# Paper Tables 1 (BERT 12->16) and 2 (UL2 12->16): final loss, regret, relative regret.
TABLE_1 = {"oracle": (1.7461, 0.0, 0.0), "lag200": (1.7461, 0.0, 0.0),
           "lag0": (1.7875, 0.0414, 0.7986), "stack_last": (1.7747, 0.0286, 0.5517)}
TABLE_2 = {"oracle": (2.1254, 0.0, 0.0), "lag2000": (2.1268, 0.0014, 0.0895),
           "lag0": (2.1398, 0.0144, 0.9202), "stack_last": (2.1357, 0.0103, 0.6582)}


@pytest.mark.parametrize("table", [TABLE_1, TABLE_2], ids=["table1", "table2"])
def test_regret_reproduces_paper_tables(table):
    # The tables do not print l_max; eq. 2 on the LAG@0 row gives it, and every other row must
    # then agree with the printed relative regret.
    l_min = table["oracle"][0]
    l_max = l_min + table["lag0"][1] / table["lag0"][2]
    final = {name: row[0] for name, row in table.items()} | {"worst": l_max}
    for name, (_, reg, rel) in table.items():
        assert regret(final, chosen=name) == pytest.approx(reg, abs=1e-9)
        assert relative_regret(final, chosen=name) == pytest.approx(rel, abs=6e-4)
    assert relative_regret(final, chosen="worst") == pytest.approx(1.0)


def test_regret_errors_and_zero_spread():
    with pytest.raises(ValueError, match="no final loss"):
        regret({"a": 1.0}, chosen="b")
    with pytest.raises(ValueError, match="non-finite"):
        regret({"a": 1.0, "b": math.nan}, chosen="a")
    assert relative_regret({"a": 2.0, "b": 2.0}, chosen="b") == 0.0


def test_rank_correlations():
    assert rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert pearson(x, x ** 3) < 0.99  # monotone but not linear
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(pearson(x, np.ones(4)))
    # numpy's Pearson as a reference
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=20), rng.normal(size=20)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])


def test_step_correlation_and_recall_from_curves():
    steps = np.array([0, 10, 100])
    curves = {
        "a": Curve(name="a", steps=steps, values=np.array([3.0, 2.8, 2.0])),
        "b": Curve(name="b", steps=steps, values=np.array([3.1, 2.7, 1.9])),
        "c": Curve(name="c", steps=steps, values=np.array([3.2, 2.9, 2.1])),
    }
    at0, at10, final = (losses_at(curves, s) for s in (0, 10, 100))
    assert step_correlation(at10, final) == pytest.approx(1.0)
    assert step_correlation(at0, final) == pytest.approx(0.5)
    assert step_correlation(at0, final, method="pearson") == pytest.approx(
        np.corrcoef([3.0, 3.1, 3.2], [2.0, 1.9, 2.1])[0, 1])
    assert recall_at_k(at10, final, top_k=1) is True
    assert recall_at_k(at0, final, top_k=1) is False
    assert recall_at_k(at0, final, top_k=2) is True
    with pytest.raises(ValueError, match="method"):
        step_correlation(at0, final, method="kendall")
