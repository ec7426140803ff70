"""The checkpoint seam without DeepSpeed processes: layer tables, the plan executor, the registry."""

from __future__ import annotations

import pytest

from lag_ds.checkpoint.deepspeed_grow import moments_rule, plan_destinations, value_rule
from lag_ds.checkpoint.formats import Format, check_options, detect_format, formats
from lag_ds.checkpoint.layer_tables import TABLES, family_of_layer_keys
from lag_ds.checkpoint.megatron_layout import OUTPUT_PROJECTION_SUFFIXES
from lag_ds.checkpoint.recipes import TensorKey, plan_recipes
from lag_ds.growth import parse_operator, plan_growth

MEGATRON_DS_LAYER = ["input_layernorm.weight", "input_layernorm.bias",
                     "self_attention.query_key_value.weight", "self_attention.dense.weight",
                     "self_attention.dense.bias", "post_attention_layernorm.weight",
                     "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"]
NEOX_LAYER = ["input_layernorm.weight", "attention.query_key_value.weight", "attention.dense.weight",
              "mlp.linear1.weight", "mlp.linear2.weight", "mlp.linear2.bias"]


def test_layer_tables_infer_roles_and_tp_rules_from_names():
    assert family_of_layer_keys(MEGATRON_DS_LAYER) == "megatron-deepspeed-pipe"
    assert family_of_layer_keys(NEOX_LAYER) == "neox-pipe"
    assert family_of_layer_keys(["weight", "bias"]) is None
    meg, neox = TABLES["megatron-deepspeed-pipe"], TABLES["neox-pipe"]
    assert [meg.role(k) for k in (["word_embeddings.weight", "position_embeddings.weight"],
                                  MEGATRON_DS_LAYER, ["weight", "bias"], ["lm_head.weight"])] == [
        "embedding", "layer", "final_norm", "head"]
    assert [neox.role(k) for k in (["norm.weight"], ["final_linear.weight"])] == ["final_norm", "head"]
    assert [s for s in MEGATRON_DS_LAYER if meg.is_output_projection(s)] == [
        "self_attention.dense.weight", "self_attention.dense.bias", "mlp.dense_4h_to_h.weight",
        "mlp.dense_4h_to_h.bias"]
    assert [s for s in NEOX_LAYER if neox.is_output_projection(s)] == [
        "attention.dense.weight", "mlp.linear2.weight", "mlp.linear2.bias"]
    rules = {s: meg.tp_rule(s).cat_dim for s in MEGATRON_DS_LAYER}
    assert rules["self_attention.query_key_value.weight"] == 0 and rules["mlp.dense_h_to_4h.weight"] == 0
    assert rules["self_attention.dense.weight"] == 1 and rules["mlp.dense_4h_to_h.weight"] == 1
    assert rules["mlp.dense_4h_to_h.bias"] is None and rules["input_layernorm.weight"] is None
    assert neox.tp_rule("final_linear.weight").cat_dim == 0 and neox.tp_rule("mlp.linear2.weight").cat_dim == 1
    core = TABLES["megatron-core-gpt"]
    assert core.split_layer_name("decoder.layers.11.mlp.linear_fc2.weight") == (11, "mlp.linear_fc2.weight")
    assert core.layer_name(3, "mlp.linear_fc1.weight") == "decoder.layers.3.mlp.linear_fc1.weight"
    assert TABLES["hf-llama"].split_layer_name("model.layers.2.mlp.down_proj.weight") == (2, "mlp.down_proj.weight")


def _keys(num_layers: int) -> list[TensorKey]:
    return ([TensorKey(None, "emb")] + [TensorKey(i, s) for i in range(num_layers) for s in ("qkv", "out")]
            + [TensorKey(None, "norm")])


@pytest.mark.parametrize("init,policy,expect", [
    ("duplicate", "copy", [("copy", "copy"), ("copy", "copy")]),
    ("duplicate", "zero", [("copy", "zero"), ("copy", "zero")]),
    ("zero", "copy", [("copy", "copy"), ("zero", "zero")]),
    ("random", "copy", [("random", "zero"), ("random", "zero")]),
    ("zero-random", "copy", [("random", "zero"), ("zero", "zero")]),
])
def test_plan_recipes_rules_per_init(init, policy, expect):
    plan = plan_growth(parse_operator(f"k=1,i0=1,b=1,init={init}"), 3, seed=4)  # [0, 1, 1*, 2]
    recipes = plan_recipes(_keys(3), plan, is_output_projection=lambda s: s == "out",
                           optimizer_state=policy)
    assert [r.dst for r in recipes] == _keys(4)  # non-layer tensors keep their place
    new = [r for r in recipes if r.is_new]
    assert [(r.value, r.moments) for r in new] == expect
    assert all(r.src == TensorKey(1, r.dst.name) for r in new)  # template / copy source: old layer 1
    assert all((r.seed is not None) == (r.is_new and "random" in init) for r in recipes)
    kept = [r for r in recipes if not r.is_new]
    assert [r.src.layer for r in kept if r.dst.layer is not None] == [0, 0, 1, 1, 2, 2]
    assert all(r.copies_everything for r in kept)


def test_plan_recipes_refuses_mismatched_depth_and_structure():
    plan = plan_growth(parse_operator("k=1,i0=0,b=1,init=duplicate"), 3)
    with pytest.raises(ValueError, match="planned for 3 layers but the checkpoint has 2"):
        plan_recipes(_keys(2), plan, is_output_projection=lambda s: False)
    odd = _keys(3)[:-2] + [TensorKey(2, "qkv"), TensorKey(None, "norm")]  # layer 2 lacks "out"
    with pytest.raises(ValueError, match="layer 2 holds tensors"):
        plan_recipes(odd, plan, is_output_projection=lambda s: False)
    with pytest.raises(ValueError, match="--optimizer-state"):
        plan_recipes(_keys(3), plan, is_output_projection=lambda s: False, optimizer_state="keep")


def test_zero_random_output_projections_are_zero_on_the_zero_path():
    """Regression: the ZeRO path's own rules gave zero-random output projections random values."""
    names = [f"decoder.layers.{i}.{s}" for i in range(2) for s in ("input_layernorm.weight",
                                                                 *OUTPUT_PROJECTION_SUFFIXES)]
    plan = plan_growth(parse_operator("k=1,i0=0,b=1,init=zero-random"), 2, seed=1)
    dests = [d for d in plan_destinations(names, 2, plan) if d.is_new]
    assert {d.suffix: value_rule(d) for d in dests} == {
        "input_layernorm.weight": "random", **{s: "zero" for s in OUTPUT_PROJECTION_SUFFIXES}}
    assert {moments_rule(d, "copy") for d in dests} == {"zero"}


def test_registry_sniffs_formats_and_names_options_it_cannot_honour(tmp_path):
    assert [f.name for f in formats()] == ["hf-safetensors", "deepspeed-pipe", "deepspeed-universal",
                                           "deepspeed-zero3", "deepspeed", "megatron-torch-dist"]
    hf = next(f for f in formats() if f.name == "hf-safetensors")
    with pytest.raises(ValueError, match="--target-tp does not apply to hf-safetensors checkpoints"):
        check_options(hf, {"target_tp": 2, "optimizer_state": None})
    assert check_options(hf, {"optimizer_state": None, "unsafe_load": False}) == {}
    pipe = Format("x", lambda p: False, lambda p: None, None, frozenset({"init_std"}))
    assert check_options(pipe, {"init_std": 0.01}) == {"init_std": 0.01}
    with pytest.raises(ValueError, match="no such file"):
        detect_format(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a checkpoint in any known layout"):
        detect_format(tmp_path / "empty")
    (tmp_path / "pipe" / "global_step3").mkdir(parents=True)
    (tmp_path / "pipe" / "global_step3" / "layer_01-model_00-model_states.pt").write_bytes(b"")
    (tmp_path / "pipe" / "latest").write_text("global_step3")
    assert detect_format(tmp_path / "pipe").name == "deepspeed-pipe"
    (tmp_path / "uni" / "global_step3" / "zero").mkdir(parents=True)
    (tmp_path / "uni" / "global_step3" / "zero" / "optimizer_state.pt").write_bytes(b"")
    (tmp_path / "uni" / "latest_universal").write_text("global_step3")
    assert detect_format(tmp_path / "uni").name == "deepspeed-universal"
    (tmp_path / "uni" / "latest_universal").write_text("global_step9")
    with pytest.raises(ValueError, match="latest_universal: names 'global_step9'"):
        detect_format(tmp_path / "uni")
