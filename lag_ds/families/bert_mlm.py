"""BERT: megatron-core ``BertModel`` (bidirectional encoder) trained with masked LM.

What megatron-core 0.16 gives and what we change (checked against its source):

* layers are ``encoder.layers.{i}.*`` (a ``TransformerBlock`` named ``encoder``); the parameter
  suffixes inside a layer are the GPT ones (``self_attention.linear_qkv``, ``mlp.linear_fc1``,
  ...), plus biases. The checkpoint readers use the ``megatron-core-bert`` layer table;
* the layer spec is the library's ``bert_layer_local_spec`` (pre-LN, ``AttnMaskType.padding``)
  with its ``core_attention`` swapped for :class:`~lag_ds.model.attention.SDPACoreAttention`:
  stock ``DotProductAttention`` needs CUDA. BertModel turns the ``[b, s]`` padding mask
  (1 = token) into a ``[b, 1, s, s]`` boolean mask (True = masked out), which SDPA takes as is;
* ``BertModel._sanity_check_attention_and_get_attn_mask_dimension`` asks Transformer Engine's
  version whenever the core attention is not megatron's own; :class:`LagBertModel` answers
  ``"b1ss"`` (the local layout) so it runs without TE;
* no next-sentence head (``add_binary_head=False``, ``num_tokentypes=0``): one segment per
  example, MLM only (RoBERTa's finding; the LAG paper reports MLM validation loss). Note
  megatron's BERT is pre-LN with a final LayerNorm, not Devlin et al.'s post-LN.

Presets: ``bert-tiny`` (CI), ``bert-small`` (CPU demo), ``bert-base`` (12 x 768, 110M with the
30,522 WordPiece vocabulary), ``bert-large`` (24 x 1024, 340M). ``python -m
lag_ds.families.bert_mlm bert-base`` prints the count; the tests check it on the meta device.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Sequence

from lag_ds.families import PresetLookup
from lag_ds.model.presets import ModelConfig

BERT_VOCAB = 30_522  # Devlin et al.'s uncased WordPiece vocabulary


def _bert(**kw: Any) -> ModelConfig:
    return ModelConfig(gated=False, tie_embeddings=True, normalization="LayerNorm",
                       position_embedding="learned_absolute", **kw)


PRESETS: dict[str, ModelConfig] = {
    "bert-tiny": _bert(num_layers=2, hidden_size=32, ffn_hidden_size=128, num_attention_heads=4,
                       seq_length=32),
    "bert-small": _bert(num_layers=4, hidden_size=128, ffn_hidden_size=512,
                        num_attention_heads=4, seq_length=128),
    "bert-base": _bert(num_layers=12, hidden_size=768, ffn_hidden_size=3072,
                       num_attention_heads=12, seq_length=512, vocab_size=BERT_VOCAB),
    "bert-large": _bert(num_layers=24, hidden_size=1024, ffn_hidden_size=4096,
                        num_attention_heads=16, seq_length=512, vocab_size=BERT_VOCAB),
}


def bert_layer_spec() -> Any:
    """megatron-core's local BERT layer spec with the CPU-capable SDPA core attention."""
    import copy

    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec

    from lag_ds.model.attention import SDPACoreAttention

    spec = copy.deepcopy(bert_layer_local_spec)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def _model_class() -> type:
    from megatron.core.models.bert.bert_model import BertModel

    class LagBertModel(BertModel):
        """BertModel that does not ask Transformer Engine for its mask layout (see module doc)."""

        def _sanity_check_attention_and_get_attn_mask_dimension(self) -> str:
            return "b1ss"

    return LagBertModel


class BertMlmFamily(PresetLookup):
    name = "bert-mlm"
    layer_table = "megatron-core-bert"
    presets = PRESETS

    def num_parameters(self, cfg: ModelConfig, vocab_size: int) -> int:
        """Exact count of the BertModel :meth:`build_model` builds (tied embeddings, biases)."""
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        per_layer = 4 * h * h + 2 * h * f + 9 * h + f  # weights, 5h + f biases, two LayerNorms
        embed = vocab_size * h + cfg.seq_length * h
        head = (h * h + h) + 2 * h + vocab_size  # lm_head dense + LayerNorm, output bias
        return cfg.num_layers * per_layer + embed + 2 * h + head

    def tokenizer(self, data: Any) -> Any:
        """The prepared SentencePiece model with [SEP], [CLS], [MASK] above its pieces.

        The token files hold SentencePiece ids only, so the UL2 specials (modes, sentinels) are
        simply not added: vocabulary = pieces + 3."""
        from lag_ds.data.mlm import CLS_TOKEN, MASK_TOKEN
        from lag_ds.data.tokenizer import Ul2Tokenizer

        return Ul2Tokenizer(data.tokenizer_model, num_sentinels=0,
                            mode_tokens=(CLS_TOKEN, MASK_TOKEN))

    def transformer_config(self, cfg: ModelConfig, params_dtype: Any) -> Any:
        from lag_ds.model.build import transformer_config

        return dataclasses.replace(transformer_config(cfg, params_dtype=params_dtype),
                                   add_bias_linear=True)

    def build_model(self, cfg: ModelConfig, *, vocab_size: int, seed: int,
                    params_dtype: Any = None) -> Any:
        import torch

        if cfg.position_embedding != "learned_absolute":
            raise ValueError("bert-mlm supports learned_absolute positions only")
        torch.manual_seed(seed)
        model = _model_class()(
            config=self.transformer_config(cfg, params_dtype or torch.float32),
            num_tokentypes=0, transformer_layer_spec=bert_layer_spec(), vocab_size=vocab_size,
            max_sequence_length=cfg.seq_length, pre_process=True, post_process=True,
            parallel_output=True, share_embeddings_and_output_weights=cfg.tie_embeddings,
            position_embedding_type=cfg.position_embedding, add_binary_head=False,
        )
        if torch.cuda.is_available():  # pragma: no cover - GPU path
            model = model.cuda()
        return model

    def batch_source(self, data: Any, tokenizer: Any, *, seq_len: int, global_batch_size: int,
                     seed: int) -> Any:
        from lag_ds.data.mlm import MlmBatchSource, MlmSpecials

        return MlmBatchSource(data.train_dataset(), MlmSpecials.from_tokenizer(tokenizer),
                              seq_len=seq_len, global_batch_size=global_batch_size, seed=seed)

    def validation_batches(self, data: Any, tokenizer: Any, *, seq_len: int, num_samples: int,
                           batch_size: int, seed: int) -> list[Any]:
        from lag_ds.data.mlm import MlmSpecials, mlm_validation_batches

        return mlm_validation_batches(data.valid_dataset(), MlmSpecials.from_tokenizer(tokenizer),
                                      seq_len=seq_len, num_samples=num_samples,
                                      batch_size=batch_size, seed=seed)

    def per_token_loss(self, engine: Any, batch: Any, device: Any) -> Any:
        loss, _ = engine(batch.tokens.to(device), batch.padding_mask.to(device),
                         lm_labels=batch.labels.to(device))
        return loss

    def validation_loss(self, engine: Any, batches: Sequence[Any], device: Any) -> dict[str, float]:
        """MLM loss over the chosen positions, overall and per kind (mask / random / keep).

        Sums and counts are all-reduced over the DP group, as for UL2, so the value does not
        depend on the DP degree."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from lag_ds.data.mlm import KIND_NAMES
        from lag_ds.metrics_schema import VAL_LOSS, VAL_LOSS_PREFIX

        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        sums = torch.zeros(len(KIND_NAMES), 2, dtype=torch.float64, device=device)
        was_training = engine.module.training
        engine.eval()
        with torch.no_grad():
            for batch in batches[dp_rank::dp_size]:
                per_token = self.per_token_loss(engine, batch, device).double()
                kind = batch.kind.to(device)
                for k in range(len(KIND_NAMES)):
                    chosen = kind == k + 1
                    sums[k, 0] += per_token[chosen].sum()
                    sums[k, 1] += chosen.sum()
        if was_training:
            engine.train()
        dist.all_reduce(sums, group=ps.get_data_parallel_group())
        out = {VAL_LOSS: (sums[:, 0].sum() / sums[:, 1].sum().clamp(min=1)).item()}
        for k, name in enumerate(KIND_NAMES):
            if sums[k, 1] > 0:
                out[f"{VAL_LOSS_PREFIX}{name}"] = (sums[k, 0] / sums[k, 1]).item()
        return out


FAMILY = BertMlmFamily()


if __name__ == "__main__":  # python -m lag_ds.families.bert_mlm bert-base [num_layers]
    cfg = FAMILY.get_preset(sys.argv[1] if len(sys.argv) > 1 else "bert-base")
    if len(sys.argv) > 2:
        cfg = cfg.with_layers(int(sys.argv[2]))
    vocab = cfg.vocab_size or 8000
    print(f"{sys.argv[1:2] or ['bert-base']} {cfg.num_layers} layers, vocab {vocab} (unpadded): "
          f"{FAMILY.num_parameters(cfg, vocab):,} parameters")
