"""tools/analyze_lag.py on synthetic run directories; numbers checked by independent recomputation."""

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from lag_ds.growth.space import parse_space
from lag_ds.select import Curve, select_lag, write_selection_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import analyze_lag  # noqa: E402

BASE, K, EVERY, LAST = 1000, 40, 10, 100
# loss(t) = final + (start - final) * 0.5 ** (t / 10): the order at t=0 is reversed at the end.
SHAPES = {
    "k4-i0-b1-duplicate": (3.61, 2.00),
    "k4-i4-b2-random": (3.33, 2.11),
    "k4-i8-b4-duplicate": (3.12, 2.23),   # stack last block on top
    "k4-i8-b4-random": (2.93, 2.34),      # stack random block on top
}
EARLY = "k4-i6-b2-duplicate"              # stopped at t=40: no final loss
DIVERGED = "k4-i2-b1-random"              # NaN at t=60


def _loss(name, t):
    s, f = SHAPES[name]
    return f + (s - f) * 0.5 ** (t / 10)


def _points(name, *, last):
    if name == EARLY:
        return [(t, 3.05 - 0.01 * t) for t in range(0, 41, EVERY)]
    if name == DIVERGED:
        return [(t, math.nan if t >= 60 else 3.0 - 0.012 * t) for t in range(0, last + 1, EVERY)]
    return [(t, _loss(name, t)) for t in range(0, last + 1, EVERY)]


def _make_run(root: Path, *, last=LAST, names=None, smoothing_window=1):
    names = names or [*SHAPES, EARLY, DIVERGED]
    ops = {op.name: asdict(op) for op in parse_space("paper", num_layers=12, num_new_layers=4)}
    curves = {}
    for name in names:
        run = root / "candidates" / name / "run"
        run.mkdir(parents=True)
        lines = [json.dumps({"step": BASE - 10, "val/loss": 1.9, "wall_time": 0.0})]
        for i, (t, v) in enumerate(_points(name, last=last)):
            lines.append(json.dumps({"step": BASE + t, "train/loss": 9.0, "wall_time": i + 0.5}))
            lines.append(json.dumps({"step": BASE + t, "val/loss": v, "wall_time": i + 1.0}))
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        pts = _points(name, last=last)
        curves[name] = Curve(name=name, steps=np.array([BASE + t for t, _ in pts]),
                             values=np.array([v for _, v in pts]))
    seen = {n: c.window(start=BASE, stop=BASE + K) for n, c in curves.items()}
    sel = select_lag(seen, k=K, base_step=BASE, smoothing_window=smoothing_window)
    write_selection_json(root / "selection.json", sel, data_seed=1, extra={
        "operators": {n: ops[n] for n in names}, "num_layers": {"base": 12, "grown": 16}})
    return curves


def _spearman(x, y):
    """Independent: average ranks by counting, then Pearson by the textbook formula."""
    def ranks(v):
        return [1 + sum(o < a for o in v) + 0.5 * (sum(o == a for o in v) - 1) for a in v]
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den


def _run(argv, capsys):
    rc = analyze_lag.main([str(a) for a in argv])
    return rc, capsys.readouterr()


def test_study_run_report_matches_independent_recomputation(tmp_path, capsys):
    _make_run(tmp_path)
    rc, io = _run([tmp_path, "--replay", "sh:eta=2,r0=10,k=40"], capsys)
    assert rc == 0, io.err
    out = tmp_path / "analysis"
    rep = json.loads((out / "report.json").read_text())
    assert rep["kind"] == "study" and rep["final"]["step"] == BASE + LAST
    finals = {n: _loss(n, LAST) for n in SHAPES}
    assert rep["final"]["losses"] == pytest.approx(finals)
    assert EARLY in rep["final"]["left_out"]
    assert "non-finite loss at step 1060" in rep["left_out"][DIVERGED]
    best = min(finals, key=finals.get)
    spread = max(finals.values()) - min(finals.values())
    for s in rep["steps"]:
        t = s["t"]
        at_t = {n: _loss(n, t) for n in SHAPES}
        names = sorted(at_t)
        assert s["spearman_final"] == pytest.approx(
            _spearman([at_t[n] for n in names], [finals[n] for n in names]))
        order = sorted(names, key=lambda n: (at_t[n], n))
        assert s["pick"] == order[0]
        assert s["recall"] == {str(k): best in order[:k] for k in (1, 2, 3)}
        assert s["regret"] == pytest.approx(finals[order[0]] - finals[best])
        assert s["relative_regret"] == pytest.approx((finals[order[0]] - finals[best]) / spread)
    assert rep["steps"][0]["spearman_final"] == pytest.approx(-1.0)
    # LAG@t over every evaluated t: the argmin among candidates with a point and no NaN up to t
    for row in rep["lag_at_t"]:
        t = row["t"]
        pool = {n: v for n in [*SHAPES, EARLY, DIVERGED]
                for tt, v in _points(n, last=LAST) if tt == t}
        pool = {n: v for n, v in pool.items()
                if all(math.isfinite(v2) for tt, v2 in _points(n, last=LAST) if tt <= t)}
        assert row["pick"] == min(pool, key=lambda n: (pool[n], n))
    table = {r["strategy"]: r for r in rep["table"]}
    assert table["Oracle"]["pick"] == best
    assert table["Oracle"]["candidate_steps"] == 6 * LAST
    assert table[f"LAG@{K}"]["pick"] == rep["winner"]
    assert table[f"LAG@{K}"]["candidate_steps"] == 6 * K
    assert table["Best at initialization (LAG@0)"]["pick"] == "k4-i8-b4-random"
    assert table["Best at initialization (LAG@0)"]["relative_regret"] == pytest.approx(1.0)
    assert table["Stack last block on top"]["pick"] == "k4-i8-b4-duplicate"
    assert table["Stack random block on top"]["pick"] == "k4-i8-b4-random"
    # SH eta=2, r0=10, k=40 over the 6 raced curves: rungs 10, 20, 40.
    # 6*10 -> keep 3; 3*10 -> keep 2; 2*20 -> pick.  60 + 30 + 40 = 130.
    sh = table["SH(eta=2,r0=10,k=40)"]
    assert (sh["candidate_steps"], sh["decided_at"]) == (130, 40)
    assert "SH(eta=3,r0=10,k=40)" in table and "settle(tau=0.9,m=3)" in table  # defaults
    # the correlation with final stays >= 0.9 from some t; k proposed with the 2x margin
    prop = rep["k_proposal"]
    assert prop["rule"] == "final-correlation"
    stay = [s["t"] for s in rep["steps"]]
    first = next(t for t in stay if all(s["spearman_final"] is not None
                                        and s["spearman_final"] >= 0.9
                                        for s in rep["steps"] if s["t"] >= t))
    assert prop["transition"] == first and prop["k"] == 2 * first
    figures = ["curves.png", "self_correlation.png", "correlation_with_final.png", "recall.png",
               "regret.png"]
    assert sorted(rep["figures"]) == sorted(figures)
    for f in ["report.md", *figures]:
        assert (out / f).is_file(), f
    md = (out / "report.md").read_text()
    assert "final-correlation" in md and "| Oracle |" in md
    events = list((tmp_path / "tb" / "analysis").glob("events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "analysis"),
                           size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == sorted(f"analysis/{f[:-4]}" for f in figures)
    text = acc.Tensors("analysis/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| Oracle |" in text
    rho = {e.step - BASE: e.value for e in acc.Scalars("analysis/spearman_final")}
    assert rho == pytest.approx({s["t"]: s["spearman_final"] for s in rep["steps"]})
    assert not [p for p in tmp_path.rglob(".*partial*")]


def test_smoothing_option_is_centred_over_points(tmp_path, capsys):
    _make_run(tmp_path)
    rc, io = _run([tmp_path, "--smoothing", "3", "--no-tensorboard"], capsys)
    assert rc == 0, io.err
    rep = json.loads((tmp_path / "analysis" / "report.json").read_text())
    finals = {n: _loss(n, LAST) for n in SHAPES}
    names = sorted(SHAPES)
    t = 10   # mean of t = 0, 10, 20
    sm = {n: (_loss(n, 0) + _loss(n, 10) + _loss(n, 20)) / 3 for n in names}
    row = next(s for s in rep["steps"] if s["t"] == t)
    assert row["spearman_final"] == pytest.approx(
        _spearman([sm[n] for n in names], [finals[n] for n in names]))
    assert rep["final"]["losses"] == pytest.approx(finals)   # finals stay raw


def test_race_only_run(tmp_path, capsys):
    _make_run(tmp_path, last=K, names=list(SHAPES))
    rc, io = _run([tmp_path, "--no-tensorboard", "--threshold", "0.95"], capsys)
    assert rc == 0, io.err
    rep = json.loads((tmp_path / "analysis" / "report.json").read_text())
    assert rep["kind"] == "race-only" and rep["final"] is None and rep["table"] is None
    assert all(s["spearman_final"] is None and s["recall"] is None for s in rep["steps"])
    assert [p["rule"] for p in rep["k_proposals"]] == ["self-correlation"]
    steps = rep["self_correlation"]["steps"]
    assert steps == [0, 10, 20, 30, 40]
    m = rep["self_correlation"]["matrix"]
    names = sorted(SHAPES)
    for a, ta in enumerate(steps):
        for b, tb in enumerate(steps):
            want = _spearman([_loss(n, ta) for n in names], [_loss(n, tb) for n in names])
            assert m[a][b] == pytest.approx(want)
    want_t = next(steps[i] for i in range(len(steps) - 1)
                  if all(m[i][j] >= 0.95 for j in range(i + 1, len(steps))))
    assert rep["k_proposal"]["transition"] == want_t
    assert "Race-only" in rep["verdict"]
    md = (tmp_path / "analysis" / "report.md").read_text()
    assert f"| LAG@{K} | {rep['winner']} | – | – | – | {4 * K} | {K} |" in md
    assert not (tmp_path / "analysis" / "regret.png").exists()
    assert not (tmp_path / "tb").exists()


def _nothing_written(root: Path):
    return not (root / "analysis").exists() and not (root / "tb").exists()


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    rc, io = _run([tmp_path / "nope"], capsys)
    assert rc == 2 and io.err.startswith("error: ") and "not a directory" in io.err
    assert io.err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, io = _run([empty], capsys)
    assert rc == 2 and "selection.json" in io.err and _nothing_written(empty)

    run = tmp_path / "corrupt"
    _make_run(run)
    metrics = run / "candidates" / EARLY / "run" / "metrics.jsonl"
    lines = metrics.read_text().split("\n")
    lines[2] = "{not json"
    metrics.write_text("\n".join(lines))
    rc, io = _run([run], capsys)
    assert rc == 2 and f"{metrics}:3" in io.err and io.err.count("\n") == 1
    assert _nothing_written(run)


def test_bad_options_exit_2(tmp_path, capsys):
    _make_run(tmp_path)
    rc, io = _run([tmp_path, "--smoothing", "abc"], capsys)
    assert rc == 2 and io.err.startswith("error: ") and io.err.count("\n") == 1
    rc, io = _run(["--help"], capsys)
    assert rc == 0 and "examples:" in io.out
    cand = tmp_path / "candidates" / EARLY / "report"
    for argv, word in [
        ([tmp_path, "--out", cand], "inside the candidates directory"),
        ([tmp_path, "--tb-dir", cand], "--tb-dir"),
        ([tmp_path, "--out", tmp_path / "no" / "such"], "does not exist"),
        ([tmp_path, "--replay", "sh:eta=1,r0=10,k=40"], "eta"),
        ([tmp_path, "--replay", "bogus:k=1"], "kind"),
        ([tmp_path, "--replay", "sh:x=1"], "keys"),
        ([tmp_path, "--smoothing", "4"], "--smoothing must be an odd"),
        ([tmp_path, "--threshold", "1.5"], "--threshold"),
        ([tmp_path, "--margin", "0.5"], "--margin"),
        ([tmp_path, "--horizon", "-1"], "--horizon"),
    ]:
        rc, io = _run(argv, capsys)
        assert rc == 2 and word in io.err and io.err.startswith("error: "), (argv, io.err)
        assert _nothing_written(tmp_path) and not cand.exists()


def test_rerun_replaces_the_report_and_out_elsewhere(tmp_path, capsys):
    _make_run(tmp_path)
    stale = tmp_path / ".analysis.partial-999999999-abcd"   # left by a killed run (no such pid)
    stale.mkdir()
    assert _run([tmp_path, "--no-tensorboard"], capsys)[0] == 0
    first = json.loads((tmp_path / "analysis" / "report.json").read_text())
    assert _run([tmp_path, "--no-tensorboard", "--threshold", "0.5"], capsys)[0] == 0
    second = json.loads((tmp_path / "analysis" / "report.json").read_text())
    assert (first["threshold"], second["threshold"]) == (0.9, 0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis", "candidates",
                                                          "selection.json"]
    other = tmp_path / "elsewhere"
    assert _run([tmp_path, "--no-tensorboard", "--out", other], capsys)[0] == 0
    assert (other / "report.md").is_file()


def _write_curve(root, name, points):
    run = root / "candidates" / name / "run"
    run.mkdir(parents=True)
    run.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"step": BASE + t, "val/loss": v, "wall_time": float(t)}) + "\n"
        for t, v in points))
    return Curve(name=name, steps=np.array([BASE + t for t, _ in points]),
                 values=np.array([v for _, v in points], dtype=float))


def test_one_candidate_study_has_undefined_correlations_and_no_crash(tmp_path, capsys):
    c = _write_curve(tmp_path, "only", [(t, 3.0 - 0.01 * t) for t in range(0, 101, 10)])
    write_selection_json(tmp_path / "selection.json",
                         select_lag({"only": c.window(start=BASE, stop=BASE + K)}, k=K,
                                    base_step=BASE), data_seed=0)
    rc, io = _run([tmp_path, "--no-tensorboard"], capsys)
    assert rc == 0, io.err
    rep = json.loads((tmp_path / "analysis" / "report.json").read_text())
    assert all(s["spearman_final"] is None and s["pearson_final"] is None for s in rep["steps"])
    assert all(s["regret"] == 0.0 and s["recall"]["1"] is True for s in rep["steps"])
    assert all(v is None for row in rep["self_correlation"]["matrix"] for v in row)
    assert rep["k_proposal"]["transition"] is None and "did not settle" in rep["verdict"]
    assert [r["strategy"] for r in rep["table"]][:3] == [
        "Oracle", f"LAG@{K}", "Best at initialization (LAG@0)"]   # no stack-on-top operators


def test_constant_and_tied_curves(tmp_path, capsys):
    # "a" and "b" are identical (tied everywhere), "c" is constant and ends up worst.
    curves = {n: _write_curve(tmp_path, n, pts) for n, pts in {
        "a": [(t, 3.0 - 0.01 * t) for t in range(0, 101, 10)],
        "b": [(t, 3.0 - 0.01 * t) for t in range(0, 101, 10)],
        "c": [(t, 2.5) for t in range(0, 101, 10)],
    }.items()}
    seen = {n: c.window(start=BASE, stop=BASE + K) for n, c in curves.items()}
    write_selection_json(tmp_path / "selection.json", select_lag(seen, k=K, base_step=BASE),
                         data_seed=0)
    rc, io = _run([tmp_path, "--no-tensorboard"], capsys)
    assert rc == 0, io.err
    rep = json.loads((tmp_path / "analysis" / "report.json").read_text())
    by_t = {s["t"]: s for s in rep["steps"]}
    # t=0: c (2.5) lowest, a = b = 3.0; finals a = b = 2.0 < c = 2.5 -> final-best "a" (by name)
    assert by_t[0]["pick"] == "c" and by_t[0]["relative_regret"] == 1.0
    assert by_t[0]["recall"] == {"1": False, "2": True, "3": True}
    assert by_t[0]["spearman_final"] == pytest.approx(_spearman([3.0, 3.0, 2.5], [2.0, 2.0, 2.5]))
    # t=50: a = b = 2.5 = c: all tied -> undefined correlation, pick by name
    assert by_t[50]["spearman_final"] is None and by_t[50]["pick"] == "a"
    assert by_t[100]["pick"] == "a" and by_t[100]["regret"] == 0.0
