"""Study mode end to end (tiny preset, real launcher) and tools/analyze_lag.py on its output.

Base 6 steps -> 4 candidates raced 2 at a time to LAG@4 with dense validation after growing ->
study: every candidate continues from its own step-10 checkpoint to step 14 on its slice -> the
analysis.  The report's numbers are recomputed here from the raw metrics.jsonl files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, deepspeed_env

BASE_STEPS, LAG, TOTAL = 6, 4, 14
SPACE = "starts0=0,1;blocks=1;inits=duplicate,random"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    cfg = yaml.safe_load((REPO / "launch_scripts/configs/tiny_base.yaml").read_text())
    cfg.update(cache_dir=str(root / "cache"), ds_config=str(REPO / "ds_configs/cpu_zero2.json"),
               eval_interval=2, save_interval=BASE_STEPS)
    train_config = root / "tiny.yaml"
    train_config.write_text(yaml.safe_dump(cfg))
    out = root / "out"
    cmd = [sys.executable, "-m", "lag_ds.stacking", "--out-dir", str(out), "--train-config",
           str(train_config), "--base-steps", str(BASE_STEPS), "--grow-layers", "1", "--space",
           SPACE, "--lag-steps", str(LAG), "--eval-interval", "2", "--total-steps", str(TOTAL),
           "--allocation", "local:2", "--hang-timeout-s", "240", "--base-port", "29740",
           "--study", "--dense-eval-steps", str(LAG)]
    proc = subprocess.run(cmd, cwd=REPO, env=deepspeed_env(), capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    analysis = subprocess.run([sys.executable, "tools/analyze_lag.py", str(out)], cwd=REPO,
                              env=deepspeed_env(), capture_output=True, text=True, timeout=300)
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    return {"out": out, "stdout": proc.stdout, "cmd": cmd}


def val_curve(out: Path, name: str) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "candidates" / name / "run/metrics.jsonl").read_text()
            .splitlines()]
    return {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}


def avg_ranks(values) -> np.ndarray:
    """1-based ranks, tied values sharing their mean rank (random-init candidates of this tiny
    model can tie right after growing)."""
    values = list(values)
    return np.array([sum(v < w for v in values) + (sum(v == w for v in values) + 1) / 2
                     for w in values])


def spearman(x, y) -> float | None:
    rx, ry = avg_ranks(x), avg_ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None  # undefined for a constant side
    return float(np.corrcoef(rx, ry)[0, 1])


def test_every_candidate_continued_to_the_end_with_dense_validation(study):
    out = study["out"]
    names = sorted(p.name for p in (out / "candidates").iterdir())
    assert len(names) == 4
    for name in names:
        steps = sorted(val_curve(out, name))
        assert steps[0] == BASE_STEPS and steps[-1] == TOTAL
        # dense: every step of the first LAG steps after growing, then every eval_interval
        assert set(range(BASE_STEPS, BASE_STEPS + LAG + 1)) <= set(steps)
    summary = json.loads((out / "summary.json").read_text())
    sel = json.loads((out / "selection.json").read_text())
    assert summary["study"] is True and not (out / "promoted").exists()
    assert summary["promoted_run"] == str((out / "candidates" / sel["winner"] / "run").resolve())
    assert summary["final_val_loss"] == val_curve(out, sel["winner"])[TOTAL]
    # the study run resumed from the race's checkpoint: one record per step, no step retrained
    rows = [json.loads(x) for x in (out / "candidates" / sel["winner"] / "run/metrics.jsonl")
            .read_text().splitlines() if "train/loss" in x]
    assert [r["step"] for r in rows] == list(range(BASE_STEPS + 1, TOTAL + 1))


def test_report_numbers_equal_a_recomputation_from_the_raw_curves(study):
    out = study["out"]
    report = json.loads((out / "analysis/report.json").read_text())
    names = sorted(p.name for p in (out / "candidates").iterdir())
    curves = {n: val_curve(out, n) for n in names}
    final = {n: curves[n][TOTAL] for n in names}
    assert report["kind"] == "study" and report["final"]["step"] == TOTAL
    assert report["final"]["losses"] == pytest.approx(final)
    best, worst = min(final.values()), max(final.values())
    by_t = {s["t"]: s for s in report["steps"]}
    for t in (0, LAG):
        at = [curves[n][BASE_STEPS + t] for n in names]
        expected = spearman(at, [final[n] for n in names])
        assert by_t[t]["spearman_final"] == (None if expected is None else pytest.approx(expected))
    lag_k = {row["t"]: row for row in report["lag_at_t"]}[LAG]
    pick = min(names, key=lambda n: (curves[n][BASE_STEPS + LAG], n))
    assert lag_k["pick"] == pick == json.loads((out / "selection.json").read_text())["winner"]
    assert lag_k["regret"] == pytest.approx(final[pick] - best)
    assert lag_k["relative_regret"] == pytest.approx((final[pick] - best) / (worst - best))
    assert {p.name for p in (out / "analysis").glob("*.png")} == {
        "correlation_with_final.png", "self_correlation.png", "recall.png", "regret.png",
        "curves.png"}
    assert (out / "analysis/report.md").read_text().count("|") > 10
    assert any((out / "tb/analysis").iterdir())
