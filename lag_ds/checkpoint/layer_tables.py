"""One layer-name table per model family: where a transformer layer's tensors live, and their roles.

Why: surgery runs on checkpoints other programs wrote, so everything it needs to know about a model
family is *names*: how a transformer layer's tensors are spelled (a template with a ``{layer}``
slot), which of them are the output projections a function-preserving init zeroes, which are split
over tensor-parallel ranks along which dimension, and how the tensors outside the layers
(embedding, final norm, head) are recognised. Readers infer layer roles from these tables and the
shapes they find, never from fixed offsets (mergekit's architecture files and torchtitan's
``StateDictAdapter`` do the same for their formats).

Pipeline-module families (``megatron-deepspeed-pipe``, ``neox-pipe``) write one file per spec
index; their ``{layer}`` slot is that index, and a layer file holds layer-relative keys (the
``suffix`` below), so the same suffix table serves both the files and the module's parameter names
``{layer}.{suffix}``.

    >>> table = TABLES["megatron-deepspeed-pipe"]
    >>> table.is_output_projection("self_attention.dense.weight")
    True
    >>> table.tp_rule("mlp.dense_4h_to_h.weight"), table.tp_rule("mlp.dense_4h_to_h.bias")
    (TpRule(cat_dim=1, num_sub_params=1), TpRule(cat_dim=None, num_sub_params=1))
    >>> family_of_layer_keys(["input_layernorm.weight", "attention.query_key_value.weight"])
    'neox-pipe'
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from lag_ds.checkpoint.megatron_layout import TpRule

__all__ = ["LayerTable", "TABLES", "family_of_layer_keys", "megatron_core_table"]


@dataclass(frozen=True, kw_only=True)
class LayerTable:
    """Names of one model family. Regexes are matched (``search``) against layer-relative suffixes
    for layer tensors and against whole names (or layer-file keys) for the others."""

    family: str
    layer_template: str
    """A layer tensor's full name: ``layer_template.format(layer=i, suffix=s)``."""
    signature: tuple[str, ...]
    """Suffixes every transformer layer of this family has (how a layer is recognised)."""
    output_projections: str
    """Regex of the suffixes zeroed by a function-preserving init (weights and biases)."""
    column_parallel: str
    """Regex of tensors split along dim 0 over TP ranks (vocabulary, QKV, MLP up)."""
    row_parallel_weights: str
    """Regex of weights split along dim 1 (attention output, MLP down); their biases replicate."""
    embedding: str
    """Regex of the word embedding (a key of the embedding's layer file for pipe families)."""
    final_norm: str
    """Regex of the final norm's tensors (outside the layers)."""
    head: str
    """Regex of an untied output head."""

    def layer_name(self, layer: int, suffix: str) -> str:
        return self.layer_template.format(layer=layer, suffix=suffix)

    def split_layer_name(self, name: str) -> tuple[int, str] | None:
        head, tail = self.layer_template.split("{layer}")
        tail = tail.replace("{suffix}", "")
        match = re.fullmatch(re.escape(head) + r"(\d+)" + re.escape(tail) + r"(.+)", name)
        return (int(match.group(1)), match.group(2)) if match else None

    def is_output_projection(self, suffix: str) -> bool:
        return re.search(self.output_projections, suffix) is not None

    def is_layer(self, keys: Iterable[str]) -> bool:
        """True when ``keys`` (layer-relative) hold every tensor of this family's signature."""
        keys = set(keys)
        return all(s in keys for s in self.signature)

    def tp_rule(self, name: str) -> TpRule:
        """How ``name`` (a suffix, a layer-file key or a full name) is split over TP ranks."""
        if re.search(self.column_parallel, name):
            return TpRule(0)
        if re.search(self.row_parallel_weights, name):
            return TpRule(1)
        return TpRule(None)

    def role(self, keys: Iterable[str]) -> str:
        """Role of a non-layer group of tensors: ``embedding``, ``final_norm``, ``head`` or ``other``."""
        keys = list(keys)
        if self.is_layer(keys):
            return "layer"
        for role in ("embedding", "head", "final_norm"):
            if keys and any(re.search(getattr(self, role), k) for k in keys):
                return role
        return "other"


_MEGATRON_CORE = LayerTable(
    family="megatron-core-gpt",
    layer_template="decoder.layers.{layer}.{suffix}",
    signature=("self_attention.linear_qkv.weight", "mlp.linear_fc1.weight"),
    output_projections=r"^(self_attention\.linear_proj|mlp\.linear_fc2)\.(weight|bias)$",
    column_parallel=(r"(^embedding\.word_embeddings\.weight$|^output_layer\.weight$|"
                     r"\.linear_qkv\.(weight|bias)$|\.linear_fc1\.(weight|bias)$|"
                     r"^(self_attention\.linear_qkv|mlp\.linear_fc1)\.(weight|bias)$)"),
    row_parallel_weights=r"(^|\.)(linear_proj|linear_fc2)\.weight$",
    embedding=r"^embedding\.word_embeddings\.weight$",
    final_norm=r"^decoder\.final_layernorm\.",
    head=r"^output_layer\.weight$",
)

_MEGATRON_DS_PIPE = LayerTable(
    family="megatron-deepspeed-pipe",
    layer_template="{layer}.{suffix}",
    signature=("input_layernorm.weight", "self_attention.query_key_value.weight"),
    output_projections=r"^(self_attention\.dense|mlp\.dense_4h_to_h)\.(weight|bias)$",
    column_parallel=(r"(^|\.)(word_embeddings\.weight|lm_head\.weight|"
                     r"query_key_value\.(weight|bias)|dense_h_to_4h\.(weight|bias))$"),
    row_parallel_weights=r"(^|\.)(self_attention\.dense|dense_4h_to_h)\.weight$",
    embedding=r"(^|\.)word_embeddings\.weight$",
    final_norm=r"^(weight|bias)$",
    head=r"^lm_head\.weight$",
)

_NEOX_PIPE = LayerTable(
    family="neox-pipe",
    layer_template="{layer}.{suffix}",
    signature=("input_layernorm.weight", "attention.query_key_value.weight"),
    output_projections=r"^(attention\.dense|mlp\.linear2|mlp\.dense_4h_to_h)\.(weight|bias)$",
    column_parallel=(r"(^|\.)(word_embeddings\.weight|final_linear\.weight|"
                     r"query_key_value\.(weight|bias)|linear1\.(weight|bias)|"
                     r"dense_h_to_4h\.(weight|bias))$"),
    row_parallel_weights=r"(^|\.)(attention\.dense|linear2|dense_4h_to_h)\.weight$",
    embedding=r"(^|\.)word_embeddings\.weight$",
    final_norm=r"^norm\.(weight|bias|scale)$",
    head=r"^final_linear\.weight$",
)

_HF_LLAMA = LayerTable(
    family="hf-llama",
    layer_template="model.layers.{layer}.{suffix}",
    signature=("self_attn.q_proj.weight", "mlp.down_proj.weight"),
    output_projections=r"^(self_attn\.o_proj|mlp\.down_proj)\.(weight|bias)$",
    column_parallel=r"$^",  # HF checkpoints are not TP-sharded
    row_parallel_weights=r"$^",
    embedding=r"^model\.embed_tokens\.weight$",
    final_norm=r"^model\.norm\.",
    head=r"^lm_head\.weight$",
)

_HF_GPT2 = LayerTable(
    family="hf-gpt2",
    layer_template="transformer.h.{layer}.{suffix}",
    signature=("attn.c_attn.weight", "mlp.c_proj.weight"),
    output_projections=r"^(attn\.c_proj|mlp\.c_proj)\.(weight|bias)$",
    column_parallel=r"$^",
    row_parallel_weights=r"$^",
    embedding=r"^transformer\.wte\.weight$",
    final_norm=r"^transformer\.ln_f\.",
    head=r"^lm_head\.weight$",
)

# megatron-core BertModel (lag_ds.families.bert_mlm): the GPT layer suffixes under ``encoder``;
# the head is lm_head (dense + LayerNorm, replicated) and a vocabulary-split output bias.
_MEGATRON_CORE_BERT = LayerTable(
    family="megatron-core-bert",
    layer_template="encoder.layers.{layer}.{suffix}",
    signature=_MEGATRON_CORE.signature,
    output_projections=_MEGATRON_CORE.output_projections,
    column_parallel=(r"(^embedding\.word_embeddings\.weight$|^output_layer\.(weight|bias)$|"
                     r"\.linear_qkv\.(weight|bias)$|\.linear_fc1\.(weight|bias)$|"
                     r"^(self_attention\.linear_qkv|mlp\.linear_fc1)\.(weight|bias)$)"),
    row_parallel_weights=_MEGATRON_CORE.row_parallel_weights,
    embedding=_MEGATRON_CORE.embedding,
    final_norm=r"^encoder\.final_layernorm\.",
    head=r"^(output_layer\.(weight|bias)|lm_head\.)",
)

TABLES: dict[str, LayerTable] = {
    t.family: t for t in (_MEGATRON_CORE, _MEGATRON_DS_PIPE, _NEOX_PIPE, _HF_LLAMA, _HF_GPT2,
                          _MEGATRON_CORE_BERT)
}
MEGATRON_CORE_FAMILIES = ("megatron-core-gpt", "megatron-core-bert")
PIPE_FAMILIES = ("megatron-deepspeed-pipe", "neox-pipe")


def family_of_layer_keys(keys: Iterable[str]) -> str | None:
    """The pipe family whose transformer-layer signature ``keys`` match (None: not a layer)."""
    keys = list(keys)
    found = [f for f in PIPE_FAMILIES if TABLES[f].is_layer(keys)]
    return found[0] if len(found) == 1 else None


def megatron_core_table(names: Iterable[str]) -> LayerTable:
    """The megatron-core table (GPT ``decoder.layers``, BERT ``encoder.layers``) whose layer
    names occur in ``names`` (full parameter names); GPT when neither does (the caller then
    reports "no layers" with its own context)."""
    names = list(names)
    found = [f for f in MEGATRON_CORE_FAMILIES
             if any(TABLES[f].split_layer_name(n) for n in names)]
    if len(found) > 1:
        raise ValueError(f"parameter names mix model families {found} (decoder and encoder layers)")
    return TABLES[found[0] if found else "megatron-core-gpt"]
