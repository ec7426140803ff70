"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Why: megatron-core's stock ``DotProductAttention`` calls ``torch.cuda.current_device()`` and so
cannot run on a CPU box, and UL2's prefix-LM / non-causal span corruption need an *arbitrary*
boolean mask (bidirectional over the prefix, causal after it), not just ``causal``. This module is
swapped into the layer spec's ``core_attention`` slot (megatron-core's extension point), never a
fork of the library. On CUDA, SDPA picks its fused kernels by itself.

Shapes follow megatron-core: query/key/value ``[s, b, heads_per_partition, head_dim]``; the mask
is ``[b or 1, 1, s, s]`` bool with **True = masked out** (megatron convention); the output is
``[s, b, heads_per_partition * head_dim]``.

Example::

    from lag_ds.model.spec import gpt_layer_spec
    spec = gpt_layer_spec(use_transformer_engine=False)  # core_attention = SDPACoreAttention
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """Drop-in ``core_attention`` taking an optional arbitrary boolean mask."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        tp_size = config.tensor_model_parallel_size
        self.num_heads_per_partition = config.num_attention_heads // tp_size
        self.num_groups_per_partition = config.num_query_groups // tp_size
        self.head_dim = config.kv_channels
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor bias")
        repeat = self.num_heads_per_partition // self.num_groups_per_partition
        if repeat > 1:  # grouped-query attention: expand K/V heads to match Q heads
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is None:
            if mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
                raise ValueError(f"attention mask type {mask_type} needs an explicit mask")
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=mask_type == AttnMaskType.causal,
                dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale,
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask,
                dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale,
            )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.num_heads_per_partition * self.head_dim)
