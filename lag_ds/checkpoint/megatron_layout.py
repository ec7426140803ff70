"""Parameter names and tensor-parallel rules of a megatron-core ``GPTModel`` (one template table).

Surgery must work on checkpoints other programs wrote, so everything here is derived from parameter
*names and shapes* only:

* layer parameters are ``decoder.layers.{layer}.{suffix}``; the layer count is read from the names;
* column-parallel tensors (``linear_qkv``, ``linear_fc1``, word embeddings, ``output_layer``) are
  split along dim 0, row-parallel weights (``linear_proj``, ``linear_fc2``) along dim 1, everything
  else (norms, position embeddings, row-parallel biases) is replicated;
* a gated FFN (GLU) stores ``[gate; up]`` in ``linear_fc1`` and megatron shards each half
  separately (``stride=2``): rank r holds ``[gate_r; up_r]``. The canonical full tensor is
  ``[gate; up]`` and DeepSpeed's universal loader re-splits it with ``param_n_sub_params=2``.
  GLU is detected from shapes: ``fc1.rows == 2 * fc2.cols`` on every rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

LAYER_PATTERN = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
LAYER_TEMPLATE = "decoder.layers.{layer}.{suffix}"

# output_layer.bias: BertModel's vocabulary-split output bias (GPTModel has none)
_COLUMN = re.compile(r"(^embedding\.word_embeddings\.weight$|^output_layer\.(weight|bias)$|"
                     r"\.linear_qkv\.(weight|bias)$|\.linear_fc1\.(weight|bias)$)")
_ROW_WEIGHT = re.compile(r"\.(linear_proj|linear_fc2)\.weight$")
_FC1 = re.compile(r"\.linear_fc1\.(weight|bias)$")

OUTPUT_PROJECTION_SUFFIXES = (
    "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
    "mlp.linear_fc2.weight", "mlp.linear_fc2.bias",
)
"""Zeroing these makes a pre-norm layer an identity residual block (``zero`` init, LLaMA-Pro)."""


def split_layer_name(name: str) -> tuple[int, str] | None:
    m = LAYER_PATTERN.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def layer_name(layer: int, suffix: str) -> str:
    return LAYER_TEMPLATE.format(layer=layer, suffix=suffix)


@dataclass(frozen=True)
class TpRule:
    """How one parameter is split over tensor-parallel ranks."""

    cat_dim: int | None  # None = replicated
    num_sub_params: int = 1  # 2 for GLU fc1 (each half split separately)


def tp_rule(name: str, *, glu: bool) -> TpRule:
    if _COLUMN.search(name):
        return TpRule(0, 2 if (glu and _FC1.search(name)) else 1)
    if _ROW_WEIGHT.search(name):
        return TpRule(1)
    return TpRule(None)


def merge_tp(shards: list[torch.Tensor], rule: TpRule) -> torch.Tensor:
    """Full tensor from per-rank shards (rank order)."""
    if rule.cat_dim is None or len(shards) == 1:
        return shards[0]
    if rule.num_sub_params == 1:
        return torch.cat(shards, dim=rule.cat_dim)
    parts = [s.chunk(rule.num_sub_params, dim=rule.cat_dim) for s in shards]
    return torch.cat([torch.cat([p[i] for p in parts], dim=rule.cat_dim)
                      for i in range(rule.num_sub_params)], dim=rule.cat_dim)


def split_tp(full: torch.Tensor, rule: TpRule, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full`` at TP degree ``tp`` (inverse of :func:`merge_tp`)."""
    if rule.cat_dim is None or tp == 1:
        return full
    if full.shape[rule.cat_dim] % (tp * rule.num_sub_params):
        raise ValueError(f"dimension {rule.cat_dim} of size {full.shape[rule.cat_dim]} cannot be split over TP={tp}")
    subs = full.chunk(rule.num_sub_params, dim=rule.cat_dim)
    return torch.cat([s.chunk(tp, dim=rule.cat_dim)[rank] for s in subs], dim=rule.cat_dim).contiguous()


def detect_glu(local_shapes: dict[str, tuple[int, ...]]) -> bool:
    """True when every layer's fc1 has twice the rows of fc2's columns (per TP rank)."""
    verdicts = set()
    for name, shape in local_shapes.items():
        if name.endswith("mlp.linear_fc1.weight"):
            fc2 = local_shapes.get(name.replace("linear_fc1.weight", "linear_fc2.weight"))
            if fc2 is None:
                raise ValueError(f"{name} has no matching linear_fc2.weight")
            verdicts.add(shape[0] == 2 * fc2[1])
    if len(verdicts) > 1:
        raise ValueError("layers disagree on whether the FFN is gated (fc1 rows vs fc2 columns)")
    return verdicts == {True}


def random_layer_param(suffix: str, shape: tuple[int, ...], *, std: float, num_layers: int,
                       seed: int) -> torch.Tensor:
    """megatron-core's own init for a fresh layer parameter, drawn from ``seed``: the shared rule of
    :func:`lag_ds.checkpoint.recipes.random_tensor` with megatron-core's output projections."""
    from lag_ds.checkpoint.recipes import random_tensor

    return random_tensor(suffix, shape, std=std, num_layers=num_layers, seed=seed,
                         output_projection=suffix in OUTPUT_PROJECTION_SUFFIXES)
