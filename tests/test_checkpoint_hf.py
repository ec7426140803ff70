"""lag_ds.checkpoint.hf_safetensors: growing tiny sharded HF checkpoints (Llama, GPT-2, Qwen2).

Tiny models are built from configs (never from the hub) and saved with a 20KB shard limit, so every
source has several shards. Each grown checkpoint is loaded back with ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lag_ds.checkpoint.hf_safetensors import (
    INDEX_NAME,
    grow_hf_checkpoint,
    is_hf_checkpoint,
)
from lag_ds.checkpoint.manifest import read_manifest, verify_manifest
from lag_ds.growth import parse_operator, plan_growth

transformers = pytest.importorskip("transformers")

PREFIX = {"llama": "model.layers.", "gpt2": "transformer.h.", "qwen2": "model.layers."}
OUT_PROJ = {
    "llama": ("self_attn.o_proj.weight", "mlp.down_proj.weight"),
    "qwen2": ("self_attn.o_proj.weight", "mlp.down_proj.weight"),
    "gpt2": ("attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"),
}


def _config(arch: str):
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0,
        )
    return transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        use_sliding_window=True, sliding_window=4, max_window_layers=0,
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """arch -> a saved 3-layer model with several shards, a tokenizer file and generation config."""
    root = tmp_path_factory.mktemp("hf_src")
    out = {}
    for arch in ("llama", "gpt2", "qwen2"):
        torch.manual_seed(1234)
        model = transformers.AutoModelForCausalLM.from_config(_config(arch))
        with torch.no_grad():  # make norms non-trivial so copies are distinguishable from fresh inits
            for name, param in model.named_parameters():
                if "norm" in name or ".ln_" in name:
                    param.add_(torch.randn_like(param) * 0.1)
        path = root / arch
        model.save_pretrained(path, max_shard_size="20KB")
        (path / "tokenizer.json").write_text('{"fake": "tokenizer"}')
        out[arch] = path
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / INDEX_NAME).read_text())
    result = {}
    for key, shard in index["weight_map"].items():
        with safe_open(str(path / shard), framework="pt") as handle:
            result[key] = handle.get_tensor(key)
    return result


def _layer(tensors: dict[str, torch.Tensor], arch: str, index: int) -> dict[str, torch.Tensor]:
    prefix = f"{PREFIX[arch]}{index}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _digest_tree(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*")) if p.is_file()
    }


def _plan(spec: str, layers: int = 3, seed: int = 0):
    return plan_growth(parse_operator(spec), layers, seed=seed)


def _load(path: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_duplicate_copies_layers_bit_identically(sources, tmp_path, arch):
    src = sources[arch]
    assert len(list(src.glob("model-*.safetensors"))) > 1
    before = _digest_tree(src)
    plan = _plan("k=2,i0=1,b=1,init=duplicate")
    manifest = grow_hf_checkpoint(src, tmp_path / "grown", plan, max_shard_bytes=30_000, show_progress=False)
    dst = tmp_path / "grown"
    assert _digest_tree(src) == before  # the source is only read

    model = _load(dst)
    assert model.config.num_hidden_layers == 5
    old, new = _tensors(src), _tensors(dst)
    assert [layer.old_index for layer in plan.layers] == [0, 1, 1, 2, 2]
    for layer in plan.layers:
        got, want = _layer(new, arch, layer.new_index), _layer(old, arch, layer.old_index)
        assert got.keys() == want.keys() and got
        for name in want:
            assert torch.equal(got[name], want[name]), (layer.new_index, name)
    non_layer = {k for k in old if not k.startswith(PREFIX[arch])}
    assert non_layer and all(torch.equal(new[k], old[k]) for k in non_layer)
    assert len(new) == len(non_layer) + 5 * len(_layer(old, arch, 0))
    state = model.state_dict()
    assert torch.equal(state[f"{PREFIX[arch]}2.{OUT_PROJ[arch][0]}"], old[f"{PREFIX[arch]}1.{OUT_PROJ[arch][0]}"])

    if arch == "gpt2":  # tied embeddings: no lm_head invented, and the loaded head is tied
        assert "lm_head.weight" not in new
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    else:
        assert torch.equal(new["lm_head.weight"], old["lm_head.weight"])

    # index.json: every key is in its shard, total_size right, shards bounded by max_shard_bytes
    index = json.loads((dst / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in dst.glob("*.safetensors")) == shards
    total = 0
    for shard in shards:
        with safe_open(str(dst / shard), framework="pt") as handle:
            keys = set(handle.keys())
            assert keys == {k for k, s in index["weight_map"].items() if s == shard}
            size = sum(handle.get_tensor(k).nbytes for k in keys)
            assert handle.metadata() == {"format": "pt"}
        assert size <= 30_000
        total += size
    assert index["metadata"]["total_size"] == total == sum(t.nbytes for t in new.values())

    # other files copied, config rewritten, manifest verifies
    assert (dst / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert (dst / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    assert json.loads((dst / "config.json").read_text())[key] == 5
    assert verify_manifest(dst) == []
    assert read_manifest(dst) == manifest
    assert manifest["kind"] == "hf-safetensors"
    assert manifest["source"] == {"path": str(src), "num_layers": 3}
    assert manifest["plan"] == plan.to_dict() and manifest["extra"]["architecture"] == arch
    assert not list(tmp_path.glob(".*partial*"))


def test_flipped_byte_is_reported_by_manifest(sources, tmp_path):
    dst = tmp_path / "grown"
    grow_hf_checkpoint(sources["llama"], dst, _plan("k=1,i0=2,b=1,init=duplicate"), show_progress=False)
    shard = sorted(dst.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify_manifest(dst)
    assert len(problems) == 1 and str(shard) in problems[0] and "sha256" in problems[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_random_layers_use_model_init_and_are_deterministic(sources, tmp_path, arch):
    src = sources[arch]
    plan = _plan("k=2,i0=1,b=2,init=random", seed=7)
    for name in ("a", "b"):
        grow_hf_checkpoint(src, tmp_path / name, plan, max_shard_bytes=30_000, show_progress=False)
    grow_hf_checkpoint(src, tmp_path / "c", _plan("k=2,i0=1,b=2,init=random", seed=8), show_progress=False)
    old, a, b, c = (_tensors(p) for p in (src, tmp_path / "a", tmp_path / "b", tmp_path / "c"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same seed, same bits

    assert [(x.old_index, x.is_new) for x in plan.layers] == [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1)]
    for layer in plan.layers:
        got = _layer(a, arch, layer.new_index)
        if not layer.is_new:
            want = _layer(old, arch, layer.old_index)
            assert all(torch.equal(got[k], want[k]) for k in want)
            continue
        other_seed = _layer(c, arch, layer.new_index)
        for name, tensor in got.items():
            if tensor.dim() == 2:  # weight matrices: fresh draws, not any old layer, seed-dependent
                assert all(not torch.equal(tensor, _layer(old, arch, o)[name]) for o in range(3))
                assert not torch.equal(tensor, other_seed[name])
        if arch == "llama":
            assert got["input_layernorm.weight"].eq(1).all()
            assert abs(got["self_attn.q_proj.weight"].std().item() - 0.02) < 0.003
            assert abs(got["mlp.down_proj.weight"].std().item() - 0.02) < 0.003
        else:  # GPT-2 scales c_proj by 1/sqrt(2 * n_layer) of the *grown* model (5 layers)
            assert got["ln_1.weight"].eq(1).all() and got["attn.c_attn.bias"].eq(0).all()
            assert abs(got["attn.c_attn.weight"].std().item() - 0.02) < 0.002
            scaled = 0.02 / math.sqrt(2 * 5)
            assert abs(got["mlp.c_proj.weight"].std().item() - scaled) < 0.1 * scaled
    model = _load(tmp_path / "a")
    assert len(model.model.layers if arch == "llama" else model.transformer.h) == 5


@pytest.mark.parametrize("arch,spec", [
    ("llama", "k=2,i0=1,b=1,init=zero"),
    ("gpt2", "k=2,i0=1,b=1,init=zero"),
    ("llama", "k=2,i0=0,b=2,init=zero-random"),
    ("gpt2", "k=1,i0=2,b=1,init=zero-random"),
])
def test_zero_inits_preserve_logits(sources, tmp_path, arch, spec):
    src = sources[arch]
    plan = _plan(spec)
    grow_hf_checkpoint(src, tmp_path / "grown", plan, show_progress=False)
    before, after = _load(src), _load(tmp_path / "grown")
    grown = _tensors(tmp_path / "grown")
    for layer in plan.new_layers():
        got = _layer(grown, arch, layer.new_index)
        assert all(got[name].eq(0).all() for name in OUT_PROJ[arch])
        assert any(t.abs().sum() > 0 for n, t in got.items() if "c_attn" in n or "q_proj" in n)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got_logits = before(ids).logits, after(ids).logits
    torch.testing.assert_close(got_logits, want, atol=1e-5, rtol=0)
    assert want.abs().max() > 1e-3  # not trivially zero


def test_per_layer_config_lists_follow_the_plan(sources, tmp_path):
    plan = _plan("k=2,i0=1,b=2,init=duplicate")  # old 0,1,2 then copies of 1,2
    grow_hf_checkpoint(sources["qwen2"], tmp_path / "grown", plan, show_progress=False)
    config = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    assert config["layer_types"] == [
        "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention",
    ]
    model = _load(tmp_path / "grown")
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [None, 4, None, 4, None]


def test_single_file_source_and_is_hf_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config("llama"))
    model.save_pretrained(tmp_path / "src")
    assert (tmp_path / "src" / "model.safetensors").is_file() and not (tmp_path / "src" / INDEX_NAME).exists()
    assert is_hf_checkpoint(tmp_path / "src") and not is_hf_checkpoint(tmp_path)
    grow_hf_checkpoint(tmp_path / "src", tmp_path / "grown", _plan("k=1,i0=0,b=1,init=zero"), show_progress=False)
    assert is_hf_checkpoint(tmp_path / "grown") and verify_manifest(tmp_path / "grown") == []
    assert not (tmp_path / "grown" / "model.safetensors").exists()  # the stale single file is not copied
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "grown")(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=0)


def _break_missing_shard(src: Path) -> str:
    victim = sorted(src.glob("model-*.safetensors"))[2]
    victim.unlink()
    return f"{victim}: missing"


def _break_truncated_shard(src: Path) -> str:
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-7])
    return f"{victim}: truncated or corrupt"


def _break_index_names_absent_tensor(src: Path) -> str:
    index = json.loads((src / INDEX_NAME).read_text())
    index["weight_map"]["model.layers.1.self_attn.q_proj.weight"] = "model-00001-of-00009.safetensors"
    (src / INDEX_NAME).write_text(json.dumps(index))
    return "absent from"


def _break_weights_layer_count(src: Path) -> str:
    index = json.loads((src / INDEX_NAME).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.layers.2.")}
    (src / INDEX_NAME).write_text(json.dumps(index))
    return "weights hold decoder layers 0..1 (2 layers) but config.json num_hidden_layers=3"


def _break_model_type(src: Path) -> str:
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "bert"
    (src / "config.json").write_text(json.dumps(config))
    return "config.json: unsupported model_type='bert'"


@pytest.mark.parametrize("breaker", [
    _break_missing_shard, _break_truncated_shard, _break_index_names_absent_tensor,
    _break_weights_layer_count, _break_model_type,
])
def test_broken_source_is_refused_before_writing(sources, tmp_path, breaker):
    src = tmp_path / "src"
    shutil.copytree(sources["llama"], src)
    expected = breaker(src)
    before = _digest_tree(src)
    with pytest.raises(ValueError) as excinfo:
        grow_hf_checkpoint(src, tmp_path / "grown", _plan("k=2,i0=1,b=1,init=random"), show_progress=False)
    message = str(excinfo.value)
    assert expected in message and "\n" not in message
    assert not (tmp_path / "grown").exists() and not list(tmp_path.glob(".grown*"))
    assert _digest_tree(src) == before


def test_wrong_plan_and_existing_destination_are_refused(sources, tmp_path):
    src = sources["gpt2"]
    before = _digest_tree(src)
    with pytest.raises(ValueError, match=r"config\.json: n_layer=3 but the plan .* grows a 4-layer model"):
        grow_hf_checkpoint(src, tmp_path / "grown", _plan("k=2,i0=1,b=1,init=duplicate", layers=4),
                           show_progress=False)
    assert not (tmp_path / "grown").exists() and not list(tmp_path.glob(".grown*"))

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="destination already exists"):
        grow_hf_checkpoint(src, existing, _plan("k=1,i0=0,b=1,init=duplicate"), show_progress=False)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"] and not list(tmp_path.glob(".existing*"))

    with pytest.raises(ValueError, match="inside the source"):
        grow_hf_checkpoint(src, src / "grown", _plan("k=1,i0=0,b=1,init=duplicate"), show_progress=False)
    assert _digest_tree(src) == before


def test_failure_while_writing_leaves_nothing(sources, tmp_path, monkeypatch):
    """A crash mid-write (here: the second shard's save) leaves neither dst nor a partial dir."""
    import safetensors.torch

    calls = []
    real = safetensors.torch.save_file

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk on fire")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    with pytest.raises(OSError, match="disk on fire"):
        grow_hf_checkpoint(sources["llama"], tmp_path / "grown", _plan("k=1,i0=0,b=1,init=duplicate"),
                           max_shard_bytes=20_000, show_progress=False)
    assert len(calls) == 2
    assert not (tmp_path / "grown").exists() and not list(tmp_path.glob(".grown*"))
