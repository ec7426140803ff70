"""Data room: corpus -> SentencePiece tokenizer -> megatron-core indexed datasets -> UL2 batches.

``prepare_data(DataConfig(...), cache_dir)`` builds (or reuses) everything on disk;
``Ul2BatchSource`` turns the train split into batches that are a pure function of
(seed, step); ``validation_batches`` gives the fixed held-out set. Importing this package does
not import megatron-core (only building/reading ``.bin/.idx`` files does).
"""

from lag_ds.data.batches import Batch, TokenStream, Ul2BatchSource, collate, validation_batches
from lag_ds.data.corpus import build_demo_corpus, iter_documents, resolve_source
from lag_ds.data.indexed import (
    build_indexed_dataset,
    build_train_valid_datasets,
    is_validation_document,
    load_indexed_dataset,
)
from lag_ds.data.prepare import DataConfig, PreparedData, prepare_data
from lag_ds.data.tokenizer import MODE_TOKENS, SEP_TOKEN, SpmTrainConfig, Ul2Tokenizer
from lag_ds.data.ul2 import (
    CAUSAL,
    DENOISER_MODE_TOKENS,
    DENOISER_NAMES,
    PREFIX,
    SPAN,
    Example,
    Ul2Config,
    Ul2Specials,
    attention_mask,
    random_spans_noise_mask,
)

__all__ = [
    "Batch", "TokenStream", "Ul2BatchSource", "collate", "validation_batches",
    "build_demo_corpus", "iter_documents", "resolve_source",
    "build_indexed_dataset", "build_train_valid_datasets", "is_validation_document",
    "load_indexed_dataset",
    "DataConfig", "PreparedData", "prepare_data",
    "MODE_TOKENS", "SEP_TOKEN", "SpmTrainConfig", "Ul2Tokenizer",
    "CAUSAL", "PREFIX", "SPAN", "DENOISER_MODE_TOKENS", "DENOISER_NAMES", "Example", "Ul2Config",
    "Ul2Specials", "attention_mask", "random_spans_noise_mask",
]
