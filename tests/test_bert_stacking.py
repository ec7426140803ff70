"""The paper's BERT setting through the stage driver: 3 stages of adaptive gradual stacking on
``bert-tiny`` (masked LM, 1 -> 2 -> 3 encoder layers), each later stage a real LAG race.

Checked from the outputs: every stage's winner is the candidate with the lowest masked-LM
validation loss at k (its own curve), each stage grows the previous stage's promoted model, the
final checkpoint is a 3-layer megatron-core BertModel (``encoder.layers.*``) of the ``bert-mlm``
family, and the promoted model's loss curve continues across stages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, deepspeed_env

# The GPT adaptive-stacking test's schedule (1 -> 2 -> 3 layers), here with the bert-mlm config.
from test_adaptive_end_to_end import SCHEDULE, val


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert_stack")
    cfg = yaml.safe_load((REPO / "launch_scripts/configs/bert_tiny_base.yaml").read_text())
    cfg.update(cache_dir=str(root / "cache"), save_interval=100)
    train = root / "bert_tiny.yaml"
    train.write_text(yaml.safe_dump(cfg))
    schedule = root / "schedule.yaml"
    schedule.write_text(SCHEDULE.format(train=train))
    out = root / "out"
    cmd = [sys.executable, "-m", "lag_ds.stacking.adaptive", "--schedule", str(schedule),
           "--out-dir", str(out), "--allocation", "local:2", "--hang-timeout-s", "240",
           "--base-port", "29880"]
    proc = subprocess.run(cmd, cwd=REPO, env=deepspeed_env(), capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"out": out, "stdout": proc.stdout}


def test_each_bert_stage_races_and_keeps_the_lowest_mlm_loss(run):
    log = json.loads((run["out"] / "adaptive/stages.json").read_text())["stages"]
    assert [(s["stage"], s["layers"], s["end_step"]) for s in log] == [(1, 1, 6), (2, 2, 12),
                                                                       (3, 3, 18)]
    for s in log[1:]:
        sel = json.loads(Path(s["selection"]).read_text())
        stage_dir = Path(s["selection"]).parent
        lag_k = {n: val(stage_dir / "candidates" / n / "run/metrics.jsonl")[sel["decision_step"]]
                 for n in s["candidates"]}
        assert len(lag_k) == 2
        assert s["winner"] == sel["winner"] == min(lag_k, key=lambda n: (lag_k[n], n))
        assert sel["base_step"] == log[s["stage"] - 2]["end_step"]
        promoted = val(Path(s["run_dir"]) / "metrics.jsonl")
        assert max(promoted) == s["end_step"] and s["final_val_loss"] == promoted[s["end_step"]]


def test_the_final_model_is_a_three_layer_bert(run):
    import torch

    log = json.loads((run["out"] / "adaptive/stages.json").read_text())["stages"]
    ckpt = Path(log[-1]["run_dir"]) / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    states = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    layers = {int(k.split(".")[2]) for k in states["module"] if k.startswith("encoder.layers.")}
    assert layers == {0, 1, 2}
    assert not any(k.startswith("decoder.") for k in states["module"])
    assert states["family"] == "bert-mlm" and states["num_layers"] == 3
    rows = [json.loads(x) for x in (Path(log[-1]["run_dir"]) / "metrics.jsonl").open()]
    assert any("val/loss/mask" in r for r in rows)  # the masked-LM breakdown, not UL2's
