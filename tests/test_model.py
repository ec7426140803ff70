"""Model room: SDPA core attention semantics, presets and parameter counts."""

from __future__ import annotations

import math

import pytest
import torch

from lag_ds.model.presets import PRESETS, get_preset


def _reference_attention(q, k, v, masked_out):
    # q,k,v: [s, b, h, d]; masked_out: [b,1,s,s] True = masked
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(masked_out, float("-inf"))
    probs = scores.softmax(-1)
    out = torch.einsum("bhst,tbhd->sbhd", probs, v)
    return out.reshape(q.shape[0], q.shape[1], -1)


def _attention_module(heads=4, groups=4, head_dim=8):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lag_ds.model.attention import SDPACoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                            num_query_groups=groups, use_cpu_initialization=True)
    module = SDPACoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return module.eval()  # TransformerConfig defaults to attention_dropout=0.1


def test_sdpa_attention_matches_reference_with_prefix_mask():
    torch.manual_seed(0)
    s, b, h, d = 6, 2, 4, 8
    q, k, v = (torch.randn(s, b, h, d) for _ in range(3))
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    prefix = causal.clone()
    prefix[:3, :3] = False  # bidirectional over a 3-token prefix
    mask = torch.stack([causal, prefix]).unsqueeze(1)
    attn = _attention_module()
    out = attn(q, k, v, mask)
    torch.testing.assert_close(out, _reference_attention(q, k, v, mask))
    # the prefix row really sees the future inside the prefix, the causal row does not
    assert not torch.allclose(out[0, 0], out[0, 1])
    out_none = attn(q, k, v, None)  # None = the spec's causal mask type
    torch.testing.assert_close(out_none[:, 0], out[:, 0])


def test_sdpa_attention_grouped_query():
    torch.manual_seed(1)
    s, b, d = 5, 1, 8
    q = torch.randn(s, b, 4, d)
    k, v = torch.randn(s, b, 2, d), torch.randn(s, b, 2, d)
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    out = _attention_module(heads=4, groups=2)(q, k, v, mask)
    ref = _reference_attention(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2), mask)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("preset,layers", [("tiny", 2), ("tiny", 3), ("small", 4), ("small", 6)])
def test_parameter_count_formula_matches_megatron(world1, preset, layers):
    from lag_ds.model.build import build_gpt_model

    cfg = get_preset(preset).with_layers(layers)
    model = build_gpt_model(cfg, vocab_size=256, seed=0)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters(256)
    names = [n for n, _ in model.named_parameters()]
    assert sum(".self_attention.linear_qkv.weight" in n for n in names) == layers


def test_ul2_preset_is_the_papers_1_1b_model():
    cfg = PRESETS["ul2-1.1b"]
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, cfg.seq_length) == (
        12, 2048, 5120, 32, 1280)
    n = cfg.num_parameters(cfg.padded_vocab_size(None))
    assert 1.05e9 < n < 1.15e9
    assert cfg.with_layers(16).num_parameters(256_000) > n


def test_same_seed_same_weights_and_depth_override(world1):
    from lag_ds.model.build import build_gpt_model

    a = build_gpt_model(get_preset("tiny"), vocab_size=128, seed=7).state_dict()
    b = build_gpt_model(get_preset("tiny"), vocab_size=128, seed=7).state_dict()
    c = build_gpt_model(get_preset("tiny"), vocab_size=128, seed=8).state_dict()
    key = "decoder.layers.0.mlp.linear_fc1.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_bad_preset_and_config_errors():
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("nope")
    with pytest.raises(ValueError, match="num_attention_heads"):
        get_preset("tiny").__class__(num_layers=1, hidden_size=30, ffn_hidden_size=8, num_attention_heads=4,
                                     seq_length=8)
    with pytest.raises(ValueError, match="vocab"):
        get_preset("tiny").padded_vocab_size(None)
