"""Tokenized documents on disk in megatron-core's indexed format (``.bin`` + ``.idx``).

Why: megatron-core's ``IndexedDataset`` memory-maps token ids, so every rank reads the same
files without loading the corpus into RAM, and the files are the same ones Megatron's
``tools/preprocess_data.py`` writes (one document = one sequence, EOS appended), readable by
any Megatron tooling. Only the pure-Python ``IndexedDatasetBuilder`` / ``IndexedDataset`` of
``megatron.core.datasets.indexed_dataset`` (megatron-core 0.16.1) are used, never the compiled
``helpers`` extension.

Exact rules:

* each document becomes ``tokenizer.encode(text) + [eos_id]``, written with
  ``builder.add_document(ids, [len(ids)])`` (one sequence per document);
* token dtype: ``DType.optimal_dtype(tokenizer.vocab_size)`` unless given (``uint16`` below
  65,500 ids, else ``int32``);
* train/validation split, deterministic and streaming: document ``i`` (0-based, in source
  order) goes to validation iff ``floor((i + 1) * f) > floor(i * f)`` for
  ``f = valid_fraction``; so after ``n`` documents exactly ``floor(n * f)`` are validation,
  evenly spread (``f = 0.01``: documents 99, 199, ...);
* atomic and idempotent: all files are written under temp names and renamed (``.bin`` before
  ``.idx``) only when complete; if every target file already exists nothing is rebuilt.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from lag_ds.data.cache import temp_path

if TYPE_CHECKING:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

_ENCODE_BATCH = 256


class _Encoder(Protocol):
    vocab_size: int
    eos_id: int

    def encode_batch(self, texts: list[str], *, num_threads: int = 1) -> list[list[int]]: ...


def _paths(prefix: Path) -> tuple[Path, Path]:
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


def indexed_dataset_exists(prefix: Path) -> bool:
    return all(p.exists() for p in _paths(prefix))


def is_validation_document(index: int, valid_fraction: float) -> bool:
    """Whether document ``index`` belongs to the validation split (rule in module docstring)."""
    return math.floor((index + 1) * valid_fraction) > math.floor(index * valid_fraction)


def default_dtype(vocab_size: int) -> type[np.number]:
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def _encoded(docs: Iterable[str], tokenizer: _Encoder, num_threads: int
             ) -> Iterator[np.ndarray]:
    """Token ids + EOS for each document, encoded in batches."""
    batch: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        for ids in tokenizer.encode_batch(batch, num_threads=num_threads):
            yield np.asarray([*ids, tokenizer.eos_id], dtype=np.int64)
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) == _ENCODE_BATCH:
            yield from flush()
    yield from flush()


def build_split_datasets(docs: Iterable[str], tokenizer: _Encoder, prefixes: Sequence[Path], *,
                         valid_fraction: float | None = None,
                         dtype: type[np.number] | None = None,
                         num_threads: int = 2) -> list[int]:
    """Tokenize ``docs`` into one (``[train]``) or two (``[train, valid]``) indexed datasets.

    With two prefixes, ``valid_fraction`` in (0, 1) routes documents by
    :func:`is_validation_document`. Returns the number of documents written to each prefix
    (``[]`` if all files already existed).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefixes = [Path(p) for p in prefixes]
    if len(prefixes) == 2:
        if valid_fraction is None or not 0.0 < valid_fraction < 1.0:
            raise ValueError(f"build_split_datasets: valid_fraction must be in (0, 1), "
                             f"got {valid_fraction}")
    elif len(prefixes) != 1 or valid_fraction is not None:
        raise ValueError("build_split_datasets: give one prefix, or two prefixes and "
                         "valid_fraction")
    if all(indexed_dataset_exists(p) for p in prefixes):
        return []
    dtype = dtype or default_dtype(tokenizer.vocab_size)
    if tokenizer.vocab_size - 1 > np.iinfo(dtype).max:
        raise ValueError(f"build_split_datasets: dtype {dtype.__name__} cannot hold "
                         f"vocab_size={tokenizer.vocab_size}")
    tmps = [temp_path(p) for p in prefixes]
    counts = [0] * len(prefixes)
    for p in prefixes:
        p.parent.mkdir(parents=True, exist_ok=True)
    builders = [IndexedDatasetBuilder(f"{t}.bin", dtype=dtype) for t in tmps]
    try:
        for i, ids in enumerate(_encoded(docs, tokenizer, num_threads)):
            split = 1 if len(prefixes) == 2 and is_validation_document(i, valid_fraction) else 0
            builders[split].add_document(ids.astype(dtype), [len(ids)])
            counts[split] += 1
        for split, count in enumerate(counts):
            if count == 0:
                raise ValueError(f"build_split_datasets: no document for {prefixes[split]} "
                                 f"({sum(counts)} documents, valid_fraction={valid_fraction})")
        for builder, t in zip(builders, tmps):
            builder.finalize(f"{t}.idx")
        for t, p in zip(tmps, prefixes):
            for tmp_file, final in zip(_paths(t), _paths(p)):
                os.replace(tmp_file, final)
    finally:
        for builder, t in zip(builders, tmps):
            builder.data_file.close()
            for f in _paths(t):
                f.unlink(missing_ok=True)
    return counts


def build_indexed_dataset(docs: Iterable[str], tokenizer: _Encoder, prefix: Path, *,
                          dtype: type[np.number] | None = None) -> Path:
    """Write ``docs`` as one indexed dataset at ``prefix`` (.bin/.idx); return ``prefix``."""
    build_split_datasets(docs, tokenizer, [prefix], dtype=dtype)
    return Path(prefix)


def build_train_valid_datasets(docs: Iterable[str], tokenizer: _Encoder, train_prefix: Path,
                               valid_prefix: Path, *, valid_fraction: float,
                               dtype: type[np.number] | None = None) -> tuple[Path, Path]:
    """Split ``docs`` deterministically and write train and validation datasets."""
    build_split_datasets(docs, tokenizer, [train_prefix, valid_prefix],
                         valid_fraction=valid_fraction, dtype=dtype)
    return Path(train_prefix), Path(valid_prefix)


def load_indexed_dataset(prefix: Path) -> "IndexedDataset":
    """megatron-core's reader over ``prefix.bin``/``prefix.idx`` (memory-mapped)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not indexed_dataset_exists(Path(prefix)):
        raise ValueError(f"indexed dataset {prefix}(.bin/.idx) does not exist")
    return IndexedDataset(str(prefix), mmap=True)
