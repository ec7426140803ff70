"""One call from a data config to ready-to-read tokenizer + train/validation token files.

Why: every rank of every run calls :func:`prepare_data` with the same config at start-up. The
first caller builds (corpus -> SentencePiece -> ``.bin/.idx``), every other caller (same host or
another process on a shared filesystem with working ``flock``) waits on the lock and then
reuses the result, so there is no "rank 0 prepares, others barrier" protocol to get wrong.

Cache layout under ``cache_dir``::

    .prepare.lock                 fcntl.flock held for the whole call
    demo/demo_corpus.jsonl        the offline demo corpus (source="demo")
    tokenizers/spm-<key>.model    trained SentencePiece models (key: corpus content + params)
    data-<key>/train.{bin,idx}    tokenized splits; key = hash(corpus content, tokenizer model
    data-<key>/valid.{bin,idx}    bytes, num_sentinels, valid_fraction, text_field)
    data-<key>/tokenizer.model    copy of the tokenizer, so the entry is self-contained
    data-<key>/meta.json          written last: its presence means the entry is complete

Defaults: ``source="demo"`` (8 MB of stdlib sources), an 8,000-piece unigram SentencePiece
model trained on <= 100,000 sampled lines (seed 1234), 100 sentinels,
``valid_fraction=0.02`` (every 50th document goes to validation).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lag_ds.data.cache import atomic_write_text, file_lock, hash_files, hash_json, temp_path
from lag_ds.data.corpus import iter_documents, resolve_source, source_fingerprint
from lag_ds.data.indexed import build_split_datasets, default_dtype, load_indexed_dataset
from lag_ds.data.tokenizer import SpmTrainConfig, Ul2Tokenizer

if TYPE_CHECKING:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

_DATA_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which corpus, which tokenizer, how to split (each field changes the cache key, directly
    or through the corpus / tokenizer content)."""

    source: str = "demo"  # "demo" | file/dir path | "hf:NAME[:SPLIT]" (see corpus.py)
    text_field: str = "text"  # JSON / parquet / datasets column holding the text
    demo_max_bytes: int = 8_000_000  # size cap of the demo corpus
    tokenizer_model: str | None = None  # existing SentencePiece .model; None = train one
    vocab_size: int = 8000  # SentencePiece pieces when training (specials are added on top)
    tokenizer_type: str = "unigram"  # "unigram" | "bpe"
    tokenizer_sample_lines: int = 100_000  # lines sampled to train SentencePiece
    tokenizer_max_documents: int | None = None  # sample only from the first N documents
    tokenizer_threads: int = 2  # SentencePiece's output depends on it
    tokenizer_byte_fallback: bool = True  # unknown characters -> byte pieces (needs > 262 pieces)
    num_sentinels: int = 100  # span-corruption sentinels at the top of the vocabulary
    valid_fraction: float = 0.02  # document i is validation iff floor((i+1)f) > floor(i f)
    seed: int = 1234  # tokenizer-training sample seed

    def __post_init__(self) -> None:
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"DataConfig.valid_fraction must be in (0, 1), "
                             f"got {self.valid_fraction}")
        if self.num_sentinels < 1:
            raise ValueError(f"DataConfig.num_sentinels must be >= 1, got {self.num_sentinels}")
        if self.tokenizer_model is not None and not Path(self.tokenizer_model).is_file():
            raise ValueError(f"DataConfig.tokenizer_model {self.tokenizer_model} does not exist")
        if self.tokenizer_model is None:
            self.spm_config()  # validates the tokenizer-training fields now

    def spm_config(self) -> SpmTrainConfig:
        return SpmTrainConfig(vocab_size=self.vocab_size, model_type=self.tokenizer_type,
                              input_sentence_size=self.tokenizer_sample_lines,
                              max_documents=self.tokenizer_max_documents,
                              byte_fallback=self.tokenizer_byte_fallback,
                              num_threads=self.tokenizer_threads, seed=self.seed)


@dataclass(frozen=True, kw_only=True)
class PreparedData:
    """Paths of a finished cache entry plus loaders for them."""

    directory: Path
    tokenizer_model: Path
    num_sentinels: int
    train_prefix: Path
    valid_prefix: Path
    num_train_documents: int
    num_valid_documents: int

    def tokenizer(self) -> Ul2Tokenizer:
        return Ul2Tokenizer(self.tokenizer_model, num_sentinels=self.num_sentinels)

    def train_dataset(self) -> "IndexedDataset":
        return load_indexed_dataset(self.train_prefix)

    def valid_dataset(self) -> "IndexedDataset":
        return load_indexed_dataset(self.valid_prefix)

    def describe(self) -> str:
        """One line with the sizes a user wants to see at start-up (cheap: file sizes only)."""
        vocab = self.tokenizer().vocab_size

        def tokens(prefix: Path) -> int:  # .bin holds nothing but the token ids
            itemsize = np.dtype(default_dtype(vocab)).itemsize
            return prefix.with_suffix(".bin").stat().st_size // itemsize

        meta = json.loads((self.directory / "meta.json").read_text(encoding="utf-8"))
        source = Path(str(meta.get("source", "")))
        size = (f" ({source.stat().st_size / 1e6:.1f} MB)" if source.is_file() else "")
        return (f"corpus {source.name or meta.get('source')}{size}, tokenizer vocab "
                f"{vocab:,}, train {self.num_train_documents:,} documents "
                f"/ {tokens(self.train_prefix):,} tokens, validation "
                f"{self.num_valid_documents:,} documents / {tokens(self.valid_prefix):,} tokens")


def _load_meta(directory: Path) -> PreparedData | None:
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return PreparedData(directory=directory, tokenizer_model=directory / "tokenizer.model",
                        num_sentinels=meta["num_sentinels"],
                        train_prefix=directory / "train", valid_prefix=directory / "valid",
                        num_train_documents=meta["num_train_documents"],
                        num_valid_documents=meta["num_valid_documents"])


def prepare_data(config: DataConfig, cache_dir: Path) -> PreparedData:
    """Build or reuse corpus, tokenizer and train/validation token files for ``config``."""
    cache_dir = Path(cache_dir)
    with file_lock(cache_dir / ".prepare.lock"):
        source = resolve_source(config.source, cache_dir, demo_max_bytes=config.demo_max_bytes)
        if config.tokenizer_model is not None:
            tok = Ul2Tokenizer(config.tokenizer_model, num_sentinels=config.num_sentinels)
        else:
            tok = Ul2Tokenizer.train_or_load(source, cache_dir / "tokenizers",
                                             config=config.spm_config(),
                                             num_sentinels=config.num_sentinels,
                                             text_field=config.text_field)
        key = hash_json({
            "format": _DATA_FORMAT,
            "source": source_fingerprint(source, text_field=config.text_field),
            "tokenizer": hash_files([tok.model_file]),
            "num_sentinels": config.num_sentinels,
            "valid_fraction": config.valid_fraction,
            "text_field": config.text_field,
        })
        directory = cache_dir / f"data-{key[:20]}"
        prepared = _load_meta(directory)
        if prepared is not None:
            return prepared
        counts = build_split_datasets(iter_documents(source, text_field=config.text_field), tok,
                                      [directory / "train", directory / "valid"],
                                      valid_fraction=config.valid_fraction)
        if not counts:  # files complete but meta lost: count documents from the index
            counts = [len(load_indexed_dataset(directory / s).document_indices) - 1
                      for s in ("train", "valid")]
        tmp = temp_path(directory / "tokenizer.model")
        shutil.copyfile(tok.model_file, tmp)
        os.replace(tmp, directory / "tokenizer.model")
        meta = {"tokenizer_source": str(tok.model_file.resolve()),
                "num_sentinels": config.num_sentinels, "num_train_documents": counts[0],
                "num_valid_documents": counts[1], "source": source, "config": asdict(config)}
        atomic_write_text(directory / "meta.json", json.dumps(meta, indent=1, default=str))
        prepared = _load_meta(directory)
        assert prepared is not None
        return prepared
