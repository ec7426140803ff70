"""Model families: one module per (architecture, objective) pair, chosen by ``TrainConfig.family``.

Why a seam: the trainer, the checkpoint readers and the LAG orchestrator used to name
``GPTModel``, the GPT layer spec, the UL2 loss and ``decoder.layers`` directly. A family module
now owns all of that for one architecture, so adding BERT (or another) is one new module and
one registry line, and every existing config keeps the default ``gpt-ul2`` unchanged.

A family provides (see :class:`Family`): its presets, its tokenizer view of the prepared data,
``build_model`` (megatron-core model with the CPU-capable SDPA core attention swapped into its
layer spec), ``layer_table`` (the :mod:`lag_ds.checkpoint.layer_tables` entry the checkpoint
readers use for its parameter names) and its objective: a batch source that is a pure function
of (seed, step), a fixed validation set, the per-token loss of one batch and the validation
breakdown.

Example::

    family = get_family("bert-mlm")
    cfg = family.get_preset("bert-tiny")
    model = family.build_model(cfg, vocab_size=640, seed=1)
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, Sequence

DEFAULT_FAMILY = "gpt-ul2"
_MODULES = {"gpt-ul2": "lag_ds.families.gpt_ul2", "bert-mlm": "lag_ds.families.bert_mlm"}
FAMILY_NAMES = tuple(_MODULES)


class PresetLookup:
    """``get_preset`` for a family class with ``name`` and ``presets`` (every family shares it)."""

    name: str
    presets: dict[str, Any]

    def get_preset(self, name: str) -> Any:
        if name not in self.presets:
            raise ValueError(f"unknown model preset {name!r} for family {self.name}; "
                             f"choose from {sorted(self.presets)}")
        return self.presets[name]


class Family(Protocol):
    name: str
    layer_table: str
    """Key of :data:`lag_ds.checkpoint.layer_tables.TABLES` naming this family's parameters."""
    presets: dict[str, Any]

    def get_preset(self, name: str) -> Any: ...

    def num_parameters(self, cfg: Any, vocab_size: int) -> int: ...

    def tokenizer(self, data: Any) -> Any: ...

    def build_model(self, cfg: Any, *, vocab_size: int, seed: int,
                    params_dtype: Any = None) -> Any: ...

    def batch_source(self, data: Any, tokenizer: Any, *, seq_len: int, global_batch_size: int,
                     seed: int) -> Any: ...

    def validation_batches(self, data: Any, tokenizer: Any, *, seq_len: int, num_samples: int,
                           batch_size: int, seed: int) -> list[Any]: ...

    def per_token_loss(self, engine: Any, batch: Any, device: Any) -> Any: ...

    def validation_loss(self, engine: Any, batches: Sequence[Any],
                        device: Any) -> dict[str, float]: ...


def get_family(name: str) -> Family:
    if name not in _MODULES:
        raise ValueError(f"unknown model family {name!r}; choose from {list(FAMILY_NAMES)}")
    return importlib.import_module(_MODULES[name]).FAMILY


def family_of_preset(preset: str) -> str | None:
    """The family whose preset table holds ``preset`` (None: no family has it)."""
    for name in FAMILY_NAMES:
        if preset in get_family(name).presets:
            return name
    return None
