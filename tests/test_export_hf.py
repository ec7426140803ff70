"""``tools/export_hf.py``: lag_ds checkpoints load in ``transformers`` and compute the same logits.

Ground truth is the lag_ds model itself (megatron-core ``GPTModel`` from ``lag_ds.model.build``,
TP=1, fp32): for the ZeRO-0 case the very module DeepSpeed saved; for the trainer's TP=2 ZeRO-2
run a model loaded with the checkpoint's TP-merged values; for a function-preserving grown
(``init=zero``, universal layout) checkpoint the *un-grown* source model. The HF model is loaded
with ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` and must match on the
same tokens to ``ATOL`` (fp32; measured max abs diff 0.9-1.2e-7).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BIN, REPO, deepspeed_env

from lag_ds.train.distributed import free_port

ATOL = 1e-5
"""Max abs difference of fp32 logits, HF vs lag_ds (summation order differs, nothing else)."""
VOCAB = 640  # the tiny run's tokenizer (616 ids) padded to a multiple of 128


def _export(*args: str) -> tuple[int, str]:
    import io
    from contextlib import redirect_stderr

    sys.path.insert(0, str(REPO / "tools"))
    try:
        import export_hf
    finally:
        sys.path.pop(0)
    err = io.StringIO()
    with redirect_stderr(err):
        code = export_hf.main([*args, "--no-progress"])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The trainer's own run: tiny preset, TP=2 x DP=1, ZeRO-2, 2 steps (stock DeepSpeed)."""
    root = tmp_path_factory.mktemp("export_run")
    run_dir = root / "run"
    run_dir.mkdir()
    cfg = yaml.safe_load((REPO / "launch_scripts/configs/tiny_base.yaml").read_text())
    cfg.update(run_dir=str(run_dir), cache_dir=str(root / "cache"), train_steps=2,
               save_interval=2, eval_interval=2, eval_samples=8, tensor_parallel=2,
               ds_config=str(REPO / "ds_configs/cpu_zero2.json"))
    config = run_dir / "train_config.yaml"  # where the LAG driver puts every job's config
    config.write_text(yaml.safe_dump(cfg))
    port = free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           "--module", "lag_ds.train", "--config", str(config)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=deepspeed_env(), capture_output=True, text=True,
                              timeout=300)
    finally:  # DeepSpeed leaves its CPU all-reduce segments behind (README: known problems)
        for segment in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            segment.unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def _lag_ds_model(num_layers: int, state: dict[str, torch.Tensor], **changes):
    """A TP=1 lag_ds model (tiny preset) holding ``state`` (full tensors)."""
    from lag_ds.model.build import build_gpt_model
    from lag_ds.model.presets import get_preset

    cfg = dataclasses.replace(get_preset("tiny").with_layers(num_layers), **changes)
    model = build_gpt_model(cfg, vocab_size=VOCAB, seed=99)
    if state:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), \
            (missing, unexpected)
    return model.eval()


def _lag_ds_logits(model, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, None).float()


def _hf_logits(out: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(seed))


def test_export_trainer_run_tp2_zero2(run, tmp_path, world1):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lag_ds.checkpoint.deepspeed_source import DeepSpeedCheckpoint
    from lag_ds.data.tokenizer import Ul2Tokenizer

    out = tmp_path / "hf"
    code, err = _export(str(run), str(out))  # a run directory: config + tokenizer found by itself
    assert code == 0, err
    assert {"model.safetensors", "config.json", "modeling_lagds.py", "configuration_lagds.py",
            "tokenizer.json", "tokenizer_config.json", "manifest.json"} \
        <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["vocab_size"],
            config["tie_word_embeddings"]) == (2, 4, VOCAB, True)

    ck = DeepSpeedCheckpoint(run / "checkpoints")
    assert (ck.tp, ck.zero_stage) == (2, 2)
    ref = _lag_ds_model(2, {n: ck.full_value(n) for n in ck.param_names})
    ids = _tokens()
    diff = (_hf_logits(out, ids) - _lag_ds_logits(ref, ids)).abs().max().item()
    print(f"max abs logit diff: {diff:.2e}")
    assert diff < ATOL, diff

    # tokenizer: with remote code, SentencePiece itself -> lag_ds's ids for every text; without
    # (tokenizer.json) the same ids except where equal-score segmentations tie (space runs)
    tok = Ul2Tokenizer(out / "tokenizer.model")
    exact = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    fast = AutoTokenizer.from_pretrained(out)
    assert type(exact).__name__ == "LagDSTokenizer" and type(fast).__name__ == "TokenizersBackend"
    docs = [json.loads(line)["text"] for line in
            (run.parent / "cache/demo/demo_corpus.jsonl").read_text().splitlines()[:20]]
    texts = [d[:2000] for d in docs] + ["Grüße, 世界! 🤖\t x\n\n  y  ", "1234567 + 89", " "]
    fast_differs = 0
    for text in texts:
        ids_text = tok.encode(text)
        assert exact.encode(text, add_special_tokens=False) == ids_text
        assert exact.decode(ids_text) == text == fast.decode(ids_text)
        fast_differs += fast.encode(text, add_special_tokens=False) != ids_text
    assert fast_differs <= 2, fast_differs  # measured: 1 of these 23 texts (a 14-space run)
    for hf_tok in (exact, fast):
        assert hf_tok.convert_tokens_to_ids(["[SEP]", "[NLU]", "<extra_id_0>", "<extra_id_99>"]) \
            == [tok.sep_id, tok.mode_id("[NLU]"), tok.sentinel_id(0), tok.sentinel_id(99)]
        assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 2, 3)
        assert hf_tok("def f():")["input_ids"] == tok.encode("def f():")  # no bos/eos added

    # generation with the KV cache agrees with a full forward (positions continue correctly)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    prompt = torch.tensor([tok.encode("def main(")])
    gen = model.generate(prompt, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        full = model(gen).logits
    assert torch.equal(full[0, prompt.shape[1] - 1:-1].argmax(-1), gen[0, prompt.shape[1]:])
    # left padding: learned positions start at each row's first real token, as unpadded
    exact.padding_side = "left"
    batch = exact(["def main():\n    return", "import os"], return_tensors="pt", padding=True)
    kw = {"max_new_tokens": 3, "do_sample": False, "output_scores": True,
          "return_dict_in_generate": True}
    padded = model.generate(**batch, **kw).scores
    alone = model.generate(**exact(["import os"], return_tensors="pt"), **kw).scores
    assert max((a[1] - b[0]).abs().max().item() for a, b in zip(padded, alone)) < ATOL


def test_export_grown_universal_checkpoint(run, tmp_path, world1):
    """A zero-init grown candidate (universal layout, 3 layers) computes its source's function."""
    from lag_ds.checkpoint.deepspeed_grow import grow_deepspeed_checkpoint
    from lag_ds.checkpoint.deepspeed_source import DeepSpeedCheckpoint
    from lag_ds.growth import parse_operator, plan_growth

    grown = tmp_path / "grown"
    plan = plan_growth(parse_operator("k=1,i0=1,b=1,init=zero"), 2, seed=0)
    grow_deepspeed_checkpoint(run / "checkpoints", grown, plan, show_progress=False)
    out = tmp_path / "hf"
    code, err = _export(str(grown), str(out), "--config", str(run / "train_config.yaml"))
    assert code == 0, err
    assert "deepspeed-universal" in err
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3

    ck = DeepSpeedCheckpoint(run / "checkpoints")
    source = _lag_ds_model(2, {n: ck.full_value(n) for n in ck.param_names})
    ids = _tokens(1)
    diff = (_hf_logits(out, ids) - _lag_ds_logits(source, ids)).abs().max().item()
    print(f"max abs logit diff: {diff:.2e}")
    assert diff < ATOL, diff


def test_export_zero0_untied_deeper(run, tmp_path, world1):
    """In-process stock DeepSpeed, ZeRO-0, 3 layers, untied output layer, one AdamW step; the
    reference is the saved module itself."""
    import deepspeed

    from lag_ds.model.mpu import MegatronMpu

    model = _lag_ds_model(3, {}, tie_embeddings=False).train()
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2,
          "zero_optimization": {"stage": 0}}
    engine, *_ = deepspeed.initialize(model=model, config=ds, mpu=MegatronMpu(),
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    ids = _tokens(2)
    loss = engine(ids, torch.arange(32).expand_as(ids), None, labels=ids).mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(str(tmp_path / "ckpt"), tag="global_step1",
                           client_state={"preset": "tiny"})
    out = tmp_path / "hf"
    code, err = _export(str(tmp_path / "ckpt"), str(out),
                        "--tokenizer", str(next((run.parent / "cache/tokenizers").glob("*.model"))))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["tie_word_embeddings"]) == (3, False)
    diff = (_hf_logits(out, ids) - _lag_ds_logits(engine.module.eval(), ids)).abs().max().item()
    print(f"max abs logit diff: {diff:.2e}")
    assert diff < ATOL, diff


def test_grouped_query_split(world1):
    """The fused QKV split for ng < np (megatron-core's [q.., k, v] per group): the HF model fed
    the split tensors matches a megatron-core model with num_query_groups=2 (no checkpoint)."""
    from megatron.core.models.gpt import GPTModel

    from lag_ds.export.hf import ModelShape, _hf_config, hf_tensors
    from lag_ds.export.hf_code.configuration_lagds import LagDSConfig
    from lag_ds.export.hf_code.modeling_lagds import LagDSForCausalLM
    from lag_ds.model.build import transformer_config
    from lag_ds.model.presets import get_preset
    from lag_ds.model.spec import gpt_layer_spec

    cfg = get_preset("tiny")
    torch.manual_seed(3)
    tc = dataclasses.replace(transformer_config(cfg), num_query_groups=2)
    ref = GPTModel(config=tc, transformer_layer_spec=gpt_layer_spec(), vocab_size=VOCAB,
                   max_sequence_length=cfg.seq_length, position_embedding_type="learned_absolute",
                   share_embeddings_and_output_weights=True).eval()
    shape = ModelShape(vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=64, num_layers=2,
                       num_heads=4, num_query_groups=2, max_positions=32, tied=True)
    state = {k: t for n, v in ref.state_dict().items() if not n.endswith("_extra_state")
             for k, t in hf_tensors(n, v, shape)}
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)
    config = {k: v for k, v in _hf_config(shape, None, "float32").items()
              if k not in ("auto_map", "architectures", "model_type", "transformers_version")}
    hf = LagDSForCausalLM(LagDSConfig(**config)).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ids = _tokens(3)
    with torch.no_grad():
        diff = (hf(ids).logits - _lag_ds_logits(ref, ids)).abs().max().item()
    print(f"max abs logit diff: {diff:.2e}")
    assert diff < ATOL, diff


def test_cli_errors_and_help(run, tmp_path, capsys):
    from lag_ds.export.hf import resolve_source

    ckpt = run / "checkpoints"
    lonely = tmp_path / "lonely"  # a tag directory outside its run: no config, no tokenizer
    shutil.copytree(ckpt / "global_step2", lonely)
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "o1")], "no such file or directory"),
        ([str(run), str(run)], "already exists"),
        ([str(run), str(ckpt / "hf")], "inside the source"),
        ([str(lonely), str(tmp_path / "o2")], "no tokenizer"),
        ([str(run), str(tmp_path / "o3"), "--num-heads", "3"], "not divisible"),
    ]
    for args, message in cases:
        code, err = _export(*args)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (args, err)
    assert not any(p.name.startswith((".o", "o")) for p in tmp_path.iterdir())  # atomic
    code, err = _export(str(lonely), str(tmp_path / "weights"), "--no-tokenizer")
    assert code == 0, err
    assert not any("tokeniz" in p.name for p in (tmp_path / "weights").iterdir())

    with pytest.raises(SystemExit):
        _export("--help")
    assert "examples:" in capsys.readouterr().out

    # a LAG output directory and an adaptive stage log lead to the promoted run
    lag = tmp_path / "lag"
    lag.mkdir()
    (lag / "summary.json").write_text(json.dumps({"promoted_run": str(run), "winner": "w"}))
    assert resolve_source(lag).checkpoint == ckpt
    assert resolve_source(lag).train_config == run / "train_config.yaml"
    adaptive = tmp_path / "adaptive"
    adaptive.mkdir()
    stages = {"stages": [{"stage": 2, "run_dir": str(run)}]}
    (adaptive / "stages.json").write_text(json.dumps(stages))
    assert resolve_source(adaptive).checkpoint == ckpt
    assert resolve_source(ckpt / "global_step2").train_config == run / "train_config.yaml"
