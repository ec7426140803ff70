"""The transformer layer spec used by every lag_ds model.

Extension by substitution (megatron-core's own pattern): take the library's local spec and swap
its ``core_attention`` for :class:`SDPACoreAttention`, which runs on CPU and accepts the
arbitrary prefix-LM masks of UL2. With Transformer Engine installed and CUDA present, the TE spec
is used instead with ``AttnMaskType.arbitrary`` (TE's fused attention takes the same boolean mask).

Parameter names are identical between the two local variants, which is what checkpoint surgery
relies on (``decoder.layers.{i}.self_attention.linear_qkv.weight`` ...).
"""

from __future__ import annotations

import copy
import importlib.util

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from lag_ds.model.attention import SDPACoreAttention


def transformer_engine_available() -> bool:
    """TE is used only where it can run: installed *and* a CUDA device present."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def gpt_layer_spec(*, normalization: str = "RMSNorm", use_transformer_engine: bool | None = None) -> ModuleSpec:
    """Layer spec with an attention that takes arbitrary masks (UL2 prefix-LM)."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:  # pragma: no cover - needs a GPU with TE
        spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec())
        spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.arbitrary}
        return spec
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization))
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec
