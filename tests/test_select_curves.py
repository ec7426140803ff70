"""Reading metrics.jsonl into curves: tolerant of a torn last line, strict about anything else."""

import json
import math

import numpy as np
import pytest

from lag_ds.select import Curve, CurveSummary, load_curve


def _write(path, records, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_load_curve_picks_tag_and_names_by_run_dir(tmp_path):
    p = _write(tmp_path / "cand_a" / "metrics.jsonl", [
        {"step": 100, "wall_time": 1.0, "val/loss": 3.0, "val/loss/causal": 3.1},
        {"step": 101, "wall_time": 1.1, "train/loss": 2.9, "train/lr": 1e-4},
        {"step": 110, "wall_time": 2.0, "val/loss": 2.5},
    ])
    curve = load_curve(p)
    assert curve.name == "cand_a"
    assert curve.steps.tolist() == [100, 110]
    assert curve.values.tolist() == [3.0, 2.5]
    assert load_curve(p, "train/loss").steps.tolist() == [101]
    assert load_curve(p, "val/loss/causal", name="x").values.tolist() == [3.1]


def test_truncated_last_line_is_dropped(tmp_path):
    p = _write(tmp_path / "c" / "metrics.jsonl",
               [{"step": 0, "val/loss": 3.0}, {"step": 10, "val/loss": 2.0}],
               tail='{"step": 20, "val/lo')
    assert load_curve(p).steps.tolist() == [0, 10]


def test_garbage_line_in_the_middle_names_file_and_line(tmp_path):
    p = tmp_path / "c" / "metrics.jsonl"
    p.parent.mkdir()
    p.write_text('{"step": 0, "val/loss": 3.0}\nnot json at all\n{"step": 10, "val/loss": 2.0}\n')
    with pytest.raises(ValueError, match=rf"{p}:2: not a JSON object"):
        load_curve(p)


def test_complete_last_line_with_garbage_is_an_error(tmp_path):
    # Ends with a newline, so it was written whole: not a torn write, a corrupt file.
    p = tmp_path / "c" / "metrics.jsonl"
    p.parent.mkdir()
    p.write_text('{"step": 0, "val/loss": 3.0}\n{"step": 10, "val/lo\n')
    with pytest.raises(ValueError, match=":2:"):
        load_curve(p)


@pytest.mark.parametrize("line, msg", [
    ('{"step": "10", "val/loss": 2.0}', "'step' must be an integer"),
    ('{"step": true, "val/loss": 2.0}', "'step' must be an integer"),
    ('[1, 2]', "expected a JSON object"),
    ('{"step": 10, "val/loss": "2.0"}', "must be a number"),
])
def test_bad_records_rejected(tmp_path, line, msg):
    p = tmp_path / "c" / "metrics.jsonl"
    p.parent.mkdir()
    p.write_text('{"step": 0, "val/loss": 3.0}\n' + line + "\n")
    with pytest.raises(ValueError, match=msg):
        load_curve(p)


def test_non_finite_values_load_and_are_reported(tmp_path):
    p = tmp_path / "c" / "metrics.jsonl"
    p.parent.mkdir()
    # Python's json writes NaN/Infinity bare, which is what the trainer does.
    p.write_text(json.dumps({"step": 0, "val/loss": 3.0}) + "\n"
                 + json.dumps({"step": 5, "val/loss": float("nan")}) + "\n"
                 + json.dumps({"step": 9, "val/loss": float("inf")}) + "\n")
    curve = load_curve(p)
    assert math.isnan(curve.values[1]) and math.isinf(curve.values[2])
    assert curve.first_non_finite_step() == 5
    s = CurveSummary.of(curve)
    assert (s.num_points, s.min_loss, s.final_loss, s.num_non_finite) == (3, 3.0, None, 2)


def test_relogged_steps_after_resume_keep_the_latest(tmp_path):
    p = _write(tmp_path / "c" / "metrics.jsonl", [
        {"step": 0, "val/loss": 3.0}, {"step": 10, "val/loss": 2.5}, {"step": 20, "val/loss": 9.9},
        # restarted from the step-10 checkpoint: step 20 logged again
        {"step": 20, "val/loss": 2.2}, {"step": 30, "val/loss": 2.0},
    ])
    curve = load_curve(p)
    assert curve.steps.tolist() == [0, 10, 20, 30]
    assert curve.value_at(20) == 2.2


def test_curve_rejects_unsorted_steps_and_missing_step_lookup():
    with pytest.raises(ValueError, match="strictly increasing"):
        Curve(name="x", steps=np.array([2, 1]), values=np.array([1.0, 2.0]))
    c = Curve(name="x", steps=np.array([0, 10]), values=np.array([1.0, 2.0]))
    with pytest.raises(KeyError):
        c.value_at(5)
    assert c.window(start=1, stop=10).steps.tolist() == [10]
