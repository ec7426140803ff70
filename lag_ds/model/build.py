"""Build a megatron-core ``GPTModel`` from a :class:`ModelConfig`.

Requires ``megatron.core.parallel_state`` to be initialised (see :mod:`lag_ds.train.distributed`)
because the linear layers shard themselves over the tensor-parallel group.

Why CPU initialisation everywhere: with ``use_cpu_initialization=True`` megatron-core draws each
*full* weight from the default torch RNG and then keeps this rank's slice, so the same seed gives
the same full model at TP=1 and TP=2 (the TP-equivalence test relies on it) and a new layer's
``random`` init is reproducible on any topology.

Example::

    model = build_gpt_model(get_preset("tiny"), vocab_size=384, seed=1234)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from lag_ds.model.presets import ModelConfig
from lag_ds.model.spec import gpt_layer_spec


def transformer_config(cfg: ModelConfig, *, params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=1,
        gated_linear_unit=cfg.gated,
        activation_func=F.gelu,
        add_bias_linear=False,
        normalization=cfg.normalization,
        init_method_std=cfg.init_method_std,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
        # DeepSpeed owns gradient reduction; megatron-core must not try its own DDP hooks.
        deallocate_pipeline_outputs=False,
        use_te_rng_tracker=False,
    )


def build_gpt_model(
    cfg: ModelConfig, *, vocab_size: int, seed: int, params_dtype: torch.dtype = torch.float32
) -> GPTModel:
    """Build the model with weights drawn from ``seed`` (same full weights at any TP degree)."""
    if cfg.position_embedding == "rope" and not torch.cuda.is_available():
        raise ValueError("model.position_embedding=rope needs CUDA (megatron-core's RotaryEmbedding); use learned_absolute on CPU")
    torch.manual_seed(seed)
    model = GPTModel(
        config=transformer_config(cfg, params_dtype=params_dtype),
        transformer_layer_spec=gpt_layer_spec(normalization=cfg.normalization),
        vocab_size=vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=cfg.position_embedding,
    )
    if torch.cuda.is_available():  # pragma: no cover - GPU path
        model = model.cuda()
    return model
