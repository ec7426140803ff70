"""The bert-mlm family: presets on the meta device, MLM masking, train + resume through DeepSpeed,
growth of a BertModel checkpoint loaded back by stock DeepSpeed.

Why these: BERT is the paper's first setting (section 3.1, appendix A.1/A.3). The family must
count BERT-Base/Large right without allocating them, mask exactly as Devlin et al. (15 %,
80/10/10) with batches that are a pure function of (seed, step), and go through the same
trainer / checkpoint-surgery path as GPT, with ``encoder.layers`` names.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, deepspeed_env

from lag_ds.data.mlm import KIND_NAMES, MlmBatchSource, MlmSpecials, mlm_validation_batches
from lag_ds.families import DEFAULT_FAMILY, family_of_preset, get_family

BERT = get_family("bert-mlm")
STEPS = 6


# ----------------------------------------------------------------------------- presets / model
@pytest.mark.parametrize("preset,known", [("bert-base", 110e6), ("bert-large", 340e6)])
def test_paper_presets_on_meta_device(world1, preset, known):
    """BERT-Base/Large shapes, built on the meta device: exact count = formula, ~110M / ~340M
    (Devlin et al.'s rounded figures; no NSP pooler here, 30,522 unpadded vocabulary)."""
    cfg = BERT.get_preset(preset)
    with torch.device("meta"):
        model = BERT.build_model(cfg, vocab_size=cfg.vocab_size, seed=0)
    n = sum(p.numel() for p in model.parameters())
    print(f"{preset}: {n:,} parameters")
    assert n == BERT.num_parameters(cfg, cfg.vocab_size)
    assert abs(n - known) / known < 0.02
    names = [k for k, _ in model.named_parameters()]
    assert sum(k.endswith(".self_attention.linear_qkv.weight") for k in names) == cfg.num_layers
    assert all(not k.startswith("decoder.") for k in names)
    fc1 = model.encoder.layers[0].mlp.linear_fc1.weight
    assert fc1.shape == (cfg.ffn_hidden_size, cfg.hidden_size)


def test_bert_tiny_is_bidirectional_on_cpu_and_counts_right(world1):
    cfg = BERT.get_preset("bert-tiny").with_layers(3)
    model = BERT.build_model(cfg, vocab_size=256, seed=3).eval()
    assert sum(p.numel() for p in model.parameters()) == BERT.num_parameters(cfg, 256)
    ids = torch.randint(4, 256, (2, cfg.seq_length))
    pad = torch.ones_like(ids)
    logits, _ = model(ids, pad)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    logits2, _ = model(changed, pad)
    assert not torch.allclose(logits[:, 0], logits2[:, 0])  # position 0 sees the last token
    loss, _ = model(ids, pad, lm_labels=ids)
    assert loss.shape == ids.shape and torch.isfinite(loss).all()


def test_family_registry_and_default():
    from lag_ds.train.config import TrainConfig

    assert TrainConfig().family == DEFAULT_FAMILY == "gpt-ul2"
    assert family_of_preset("bert-base") == "bert-mlm" and family_of_preset("tiny") == "gpt-ul2"
    with pytest.raises(ValueError, match="family must be one of"):
        TrainConfig(family="t5")
    with pytest.raises(ValueError, match="unknown model preset 'tiny' for family bert-mlm"):
        BERT.get_preset("tiny")
    assert get_family("gpt-ul2").layer_table == "megatron-core-gpt"
    assert BERT.layer_table == "megatron-core-bert"


@pytest.mark.parametrize("name", ["bert_tiny_base", "bert_base", "bert_large"])
def test_bert_configs_load_and_name_their_family(name):
    from lag_ds.config import load_yaml
    from lag_ds.train.config import TrainConfig

    cfg = load_yaml(TrainConfig, REPO / f"launch_scripts/configs/{name}.yaml")
    assert cfg.family == "bert-mlm" and family_of_preset(cfg.preset) == "bert-mlm"
    assert (REPO / cfg.ds_config).is_file()


# ----------------------------------------------------------------------------- masking
SPECIALS = MlmSpecials(cls=1000, sep=1001, mask=1002, first_ordinary=4, num_ordinary_end=1000)


def _docs(n_docs=40, length=300, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 1000, size=length) for _ in range(n_docs)]


def test_masking_statistics_and_layout():
    source = MlmBatchSource(_docs(), SPECIALS, seq_len=64, global_batch_size=32, seed=5)
    kinds = np.zeros(4, dtype=np.int64)
    for step in range(25):
        b = source.global_batch(step)
        assert (b.tokens[:, 0] == SPECIALS.cls).all() and (b.tokens[:, -1] == SPECIALS.sep).all()
        assert (b.kind[:, [0, -1]] == 0).all()  # [CLS]/[SEP] are never chosen
        per_row = b.loss_mask.sum(1)
        assert (per_row == round(0.15 * 62)).all()  # exactly round(15 % of the text positions)
        assert torch.equal(b.loss_mask > 0, b.kind > 0)
        unchanged = b.kind == 0
        assert torch.equal(b.tokens[unchanged], b.labels[unchanged])
        keep = b.kind == 3
        assert torch.equal(b.tokens[keep], b.labels[keep])
        assert (b.tokens[b.kind == 1] == SPECIALS.mask).all()
        rand = b.tokens[b.kind == 2]
        assert ((rand >= SPECIALS.first_ordinary) & (rand < SPECIALS.num_ordinary_end)).all()
        kinds += np.bincount(b.kind.flatten().numpy(), minlength=4)
    chosen = kinds[1:].sum()
    frac = kinds[1:] / chosen
    print(f"{chosen} chosen positions: mask/random/keep = {np.round(frac, 4)}")
    assert abs(frac[0] - 0.8) < 0.02 and abs(frac[1] - 0.1) < 0.015 and abs(frac[2] - 0.1) < 0.015


def test_batches_are_a_pure_function_of_seed_and_step():
    a = MlmBatchSource(_docs(), SPECIALS, seq_len=64, global_batch_size=8, seed=5)
    b = MlmBatchSource(_docs(), SPECIALS, seq_len=64, global_batch_size=8, seed=5)
    c = MlmBatchSource(_docs(), SPECIALS, seq_len=64, global_batch_size=8, seed=6)
    b.global_batch(7)  # call order does not matter
    for field in ("tokens", "labels", "loss_mask", "kind"):
        assert torch.equal(getattr(a.global_batch(3), field), getattr(b.global_batch(3), field))
    assert not torch.equal(a.global_batch(3).tokens, a.global_batch(4).tokens)
    assert not torch.equal(a.global_batch(3).tokens, c.global_batch(3).tokens)
    # micro batches over DP=2 x 2 micro-steps assemble the global batch
    rows = [a.micro_batch(3, dp_rank=r, dp_size=2, micro_batch_size=2, micro_index=m).tokens
            for m in range(2) for r in range(2)]
    assert torch.equal(torch.cat(rows), a.global_batch(3).tokens)
    v1 = mlm_validation_batches(_docs(seed=1), SPECIALS, seq_len=64, num_samples=10,
                                batch_size=4, seed=5)
    v2 = mlm_validation_batches(_docs(seed=1), SPECIALS, seq_len=64, num_samples=10,
                                batch_size=4, seed=5)
    assert [x.size for x in v1] == [4, 4, 2]
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(v1, v2))


# ----------------------------------------------------------------------------- trainer + growth
def _trainer(config: Path, run_dir: Path, *sets: str) -> subprocess.CompletedProcess:
    args = ["--config", str(config), "--set", f"run_dir={run_dir}"]
    args += [a for s in sets for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "lag_ds.train", *args], cwd=REPO,
                          env=deepspeed_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in _records(run_dir) if key in r}


@pytest.fixture(scope="module")
def bert_runs(tmp_path_factory) -> dict[str, Path]:
    """bert_tiny_base.yaml (ZeRO-2, CPU): a straight 6-step run and a 3 + resume-to-6 run."""
    root = tmp_path_factory.mktemp("bert")
    cfg = yaml.safe_load((REPO / "launch_scripts/configs/bert_tiny_base.yaml").read_text())
    cfg.update(cache_dir=str(root / "cache"), ds_config=str(REPO / "ds_configs/cpu_zero2.json"),
               train_steps=STEPS, eval_interval=3, save_interval=3, log_interval=1)
    config = root / "bert_tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    straight, halves = root / "straight", root / "halves"
    _trainer(config, straight)
    _trainer(config, halves, "train_steps=3")
    _trainer(config, halves)  # same command, longer: resumes from step 3
    return {"config": config, "straight": straight, "halves": halves, "root": root}


def test_bert_tiny_trains_and_resumes_bit_exact(bert_runs):
    full, halves = (_losses(bert_runs[k], "train/loss") for k in ("straight", "halves"))
    assert sorted(halves) == list(range(1, STEPS + 1))
    assert halves == full
    val = _losses(bert_runs["straight"], "val/loss")
    assert sorted(val) == [0, 3, 6] and val[6] < val[0]
    assert val == _losses(bert_runs["halves"], "val/loss")
    last = [r for r in _records(bert_runs["straight"]) if "val/loss" in r][-1]
    assert {f"val/loss/{k}" for k in KIND_NAMES} <= set(last)  # the validation breakdown
    print(f"bert-tiny val/loss {val[0]:.4f} -> {val[6]:.4f}")
    tag_dir = bert_runs["straight"] / f"checkpoints/global_step{STEPS}"
    meta = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    assert meta["family"] == "bert-mlm"
    assert any(k.startswith("encoder.layers.1.") for k in meta["module"])


def _grow(src: Path, dst: Path, op: str) -> None:
    cmd = [sys.executable, str(REPO / "tools/grow_checkpoint.py"), "--src", str(src),
           "--dst", str(dst), "--op", op, "--no-progress", "--verify"]
    proc = subprocess.run(cmd, cwd=REPO, env=deepspeed_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_grown_bert_checkpoint_loads_in_stock_deepspeed_bit_identical(bert_runs, world1):
    """Duplicate-grow the ZeRO-2 checkpoint 2 -> 4 layers; stock DeepSpeed (universal load)
    holds every old tensor bit for bit, and each new layer is its plan's copy."""
    import deepspeed

    from lag_ds.checkpoint.deepspeed_source import DeepSpeedCheckpoint
    from lag_ds.growth import parse_operator, plan_growth
    from lag_ds.model.mpu import MegatronMpu

    src = bert_runs["straight"] / "checkpoints"
    dst = bert_runs["root"] / "grown_dup"
    op = "k=2,i0=0,b=2,init=duplicate"
    _grow(src, dst, op)
    ckpt = DeepSpeedCheckpoint(src)
    assert (ckpt.layer_table.family, ckpt.num_layers) == ("megatron-core-bert", 2)
    vocab = ckpt.full_shapes["embedding.word_embeddings.weight"][0]
    model = BERT.build_model(BERT.get_preset("bert-tiny").with_layers(4), vocab_size=vocab, seed=9)
    ds = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1,
          "zero_optimization": {"stage": 2}, "checkpoint": {"load_universal": True}}
    engine, *_ = deepspeed.initialize(model=model, config=ds, mpu=MegatronMpu(),
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    tag = (dst / "latest_universal").read_text().strip()
    path, _ = engine.load_checkpoint(str(dst), tag=tag, load_optimizer_states=True)
    assert path is not None
    assert engine.global_steps == STEPS
    plan = plan_growth(parse_operator(op), 2)
    table = ckpt.layer_table
    loaded = dict(engine.module.named_parameters())
    assert len(loaded) == len(ckpt.param_names) + 2 * 12  # 12 tensors per BERT layer
    for name, value in loaded.items():
        split = table.split_layer_name(name)
        source = (name if split is None
                  else table.layer_name(plan.layers[split[0]].copy_from, split[1]))
        assert torch.equal(value.detach(), ckpt.full_value(source)), (name, source)


def test_zero_growth_preserves_the_validation_loss(bert_runs):
    """Zero init (output projections and their biases zeroed) is function preserving for the
    pre-LN BertModel: the candidate's validation loss at the growth step is the base's."""
    dst = bert_runs["root"] / "grown_zero"
    _grow(bert_runs["straight"] / "checkpoints", dst, "k=2,i0=0,b=1,init=zero")
    cand = bert_runs["root"] / "cand"
    _trainer(bert_runs["config"], cand, f"init_from={dst}", "num_layers=4",
             f"train_steps={STEPS + 1}", f"growth_step={STEPS}")
    base_val, cand_val = (_losses(d, "val/loss") for d in (bert_runs["straight"], cand))
    assert cand_val[STEPS] == base_val[STEPS]
    assert STEPS + 1 in _losses(cand, "train/loss")
