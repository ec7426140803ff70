"""A lag_ds model (megatron-core GPTModel from ``lag_ds.model.build``) as a ``transformers`` model.

Written into an export directory by ``tools/export_hf.py`` and loaded with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.

Why it is built from Llama's classes: the decoder layer is Llama's exactly (RMSNorm ->
attention -> residual, RMSNorm -> gated MLP -> residual; no biases), so attention kernels
(eager / SDPA / flash), the KV cache, generation and ``device_map`` come from ``transformers``
unchanged. The one difference is the position encoding: lag_ds adds a **learned absolute
position embedding** to the token embedding (megatron's ``LanguageModelEmbedding``) and applies no
rotation. Here that is ``embed_positions`` added in :meth:`LagDSModel.forward`, and Llama's rotary
module is replaced by :class:`_NoRotation` (``cos = 1``, ``sin = 0``), for which Llama's
``q * cos + rotate_half(q) * sin`` returns ``q`` unchanged, bit for bit.
"""

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
)

from .configuration_lagds import LagDSConfig


class _NoRotation(nn.Module):
    """Stands in for ``LlamaRotaryEmbedding``: the identity rotation (cos 1, sin 0)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        shape = (*position_ids.shape, self.head_dim)
        return (torch.ones(shape, dtype=x.dtype, device=x.device),
                torch.zeros(shape, dtype=x.dtype, device=x.device))


class LagDSPreTrainedModel(LlamaPreTrainedModel):
    config_class = LagDSConfig
    config: LagDSConfig


class LagDSModel(LlamaModel):
    """Llama's decoder with learned absolute positions added to the token embeddings."""

    config_class = LagDSConfig

    def __init__(self, config: LagDSConfig) -> None:
        super().__init__(config)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.rotary_emb = _NoRotation(config.head_dim)
        self.post_init()

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:  # Llama's default: positions continue after the cached tokens
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + inputs_embeds.shape[1],
                                        device=inputs_embeds.device).unsqueeze(0)
        inputs_embeds = inputs_embeds + self.embed_positions(position_ids)
        return super().forward(inputs_embeds=inputs_embeds, position_ids=position_ids, **kwargs)


class LagDSForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` around :class:`LagDSModel` (tied or untied output layer)."""

    config_class = LagDSConfig

    def __init__(self, config: LagDSConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LagDSModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["LagDSForCausalLM", "LagDSModel", "LagDSPreTrainedModel"]
