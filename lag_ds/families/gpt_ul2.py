"""The original family: megatron-core ``GPTModel`` trained on the UL2 mixture of denoisers.

Every call delegates to the modules that existed before the family seam (``lag_ds.model.build``,
``lag_ds.data.batches``, ``lag_ds.train.evaluate``), so a config without ``family`` trains
exactly as before (same weights, batches and losses, bit for bit).
"""

from __future__ import annotations

from typing import Any, Sequence

from lag_ds.families import PresetLookup
from lag_ds.model.presets import PRESETS, ModelConfig


class GptUl2Family(PresetLookup):
    name = "gpt-ul2"
    layer_table = "megatron-core-gpt"
    presets = PRESETS

    def num_parameters(self, cfg: ModelConfig, vocab_size: int) -> int:
        return cfg.num_parameters(vocab_size)

    def tokenizer(self, data: Any) -> Any:
        return data.tokenizer()

    def build_model(self, cfg: ModelConfig, *, vocab_size: int, seed: int,
                    params_dtype: Any = None) -> Any:
        import torch

        from lag_ds.model.build import build_gpt_model

        return build_gpt_model(cfg, vocab_size=vocab_size, seed=seed,
                               params_dtype=params_dtype or torch.float32)

    def batch_source(self, data: Any, tokenizer: Any, *, seq_len: int, global_batch_size: int,
                     seed: int) -> Any:
        from lag_ds.data import Ul2BatchSource

        return Ul2BatchSource(data.train_dataset(), tokenizer, seq_len=seq_len,
                              global_batch_size=global_batch_size, seed=seed)

    def validation_batches(self, data: Any, tokenizer: Any, *, seq_len: int, num_samples: int,
                           batch_size: int, seed: int) -> list[Any]:
        from lag_ds.data import validation_batches

        return validation_batches(data.valid_dataset(), tokenizer, seq_len=seq_len,
                                  num_samples=num_samples, batch_size=batch_size, seed=seed)

    def per_token_loss(self, engine: Any, batch: Any, device: Any) -> Any:
        return engine(batch.tokens.to(device), batch.position_ids.to(device),
                      batch.attention_mask.to(device), labels=batch.labels.to(device))

    def validation_loss(self, engine: Any, batches: Sequence[Any], device: Any) -> dict[str, float]:
        from lag_ds.train.evaluate import validation_loss

        return validation_loss(engine, batches, device)


FAMILY = GptUl2Family()
