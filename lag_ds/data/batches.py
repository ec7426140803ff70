"""UL2 batches whose content is a pure function of (seed, global step).

Why: LAG grows a model mid-run and compares runs that resume from checkpoints with different
data-parallel layouts. If batch ``s`` depended on iterator state, a resumed or re-sharded run
would see different data and the loss curves would not be comparable. Here nothing is carried
between calls: ``global_batch(s)`` (or any rank's ``micro_batch(s, ...)``) is recomputed from
scratch, so resuming at step ``s`` is just calling it with ``s``.

Exact rules (``G`` = global batch size, ``S`` = seq_len, ``L = S - 1`` = window length, the
largest raw length any denoiser consumes):

* the train split is one token stream (documents concatenated, each ending with EOS), cut into
  ``W = total_tokens // L`` windows ``[w L, (w+1) L)`` (the tail is dropped);
* global sample ``n = step * G + j`` (row ``j`` of the batch) is in epoch ``e = n // W`` and
  uses window ``perm_e[n % W]``, where ``perm_e`` is a permutation of ``range(W)`` drawn from
  ``default_rng(SeedSequence(seed, spawn_key=(0, e)))``;
* its denoiser and all its randomness come from
  ``default_rng(SeedSequence(seed, spawn_key=(1, n)))``: first one ``random()`` picks the
  denoiser from the mixture (default 60 % causal, 20 % prefix, 20 % span), then the denoiser
  draws (prefix length or noise mask, see ul2.py); the denoiser uses the first
  ``raw_length(denoiser)`` tokens of the window;
* ``micro_batch(step, dp_rank=r, dp_size=D, micro_batch_size=b, micro_index=m)`` returns global
  rows ``(m * D + r) * b + [0, b)`` (Megatron's order: micro-step-major, then rank), so the
  union over ranks and micro-steps is the global batch for any ``D`` dividing ``G / b``;
* validation (:func:`validation_batches`): ``num_samples`` fixed examples; denoiser counts are
  the largest-remainder apportionment of ``num_samples`` by the mixture (every denoiser with
  positive weight gets >= 1), shuffled with ``SeedSequence(seed, spawn_key=(2,))``; sample
  ``i`` uses validation window ``i * W // num_samples`` (evenly spread; ``i % W`` if there are
  fewer windows than samples) and randomness ``SeedSequence(seed, spawn_key=(3, i))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from lag_ds.data.ul2 import (
    DEFAULT_MIXTURE,
    DENOISER_NAMES,
    Example,
    Ul2Config,
    Ul2Specials,
    attention_mask,
    choose_denoiser,
    make_example,
)

_PERM, _SAMPLE, _VALID_ORDER, _VALID_SAMPLE = 0, 1, 2, 3


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor  # int64 [B, S]
    labels: torch.Tensor  # int64 [B, S]
    loss_mask: torch.Tensor  # float32 [B, S]
    attention_mask: torch.Tensor  # bool [B, 1, S, S], True = masked out
    position_ids: torch.Tensor  # int64 [B, S]
    denoiser: torch.Tensor  # int64 [B], index into DENOISER_NAMES

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                        for f in fields(self)})

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])


def collate(examples: Sequence[Example], seq_len: int) -> Batch:
    """Stack examples into a :class:`Batch` (attention mask built from their prefix lengths)."""
    if not examples:
        raise ValueError("collate: no examples")
    return Batch(
        tokens=torch.from_numpy(np.stack([e.tokens for e in examples])),
        labels=torch.from_numpy(np.stack([e.labels for e in examples])),
        loss_mask=torch.from_numpy(np.stack([e.loss_mask for e in examples])),
        attention_mask=attention_mask([e.prefix_len for e in examples], seq_len),
        position_ids=torch.arange(seq_len, dtype=torch.int64).repeat(len(examples), 1),
        denoiser=torch.tensor([e.denoiser for e in examples], dtype=torch.int64),
    )


class TokenStream:
    """A dataset of documents seen as one concatenated token stream.

    Accepts megatron-core's ``IndexedDataset`` (read lazily through ``get``) or any sequence of
    1-D integer arrays (concatenated in memory; for tests and small data).
    """

    def __init__(self, dataset: Any) -> None:
        if hasattr(dataset, "sequence_lengths") and hasattr(dataset, "get"):
            self._dataset = dataset
            lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
            self._flat: np.ndarray | None = None
        else:
            self._dataset = None
            arrays = [np.asarray(d, dtype=np.int64).reshape(-1) for d in dataset]
            lengths = np.asarray([len(a) for a in arrays], dtype=np.int64)
            self._flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self.total = int(self._starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream as int64."""
        if start < 0 or length < 0 or start + length > self.total:
            raise ValueError(f"window [{start}, {start + length}) outside stream of "
                             f"{self.total} tokens")
        if self._flat is not None:
            return self._flat[start:start + length]
        out, pos, end = [], start, start + length
        doc = int(np.searchsorted(self._starts, start, side="right")) - 1
        while pos < end:
            offset = pos - int(self._starts[doc])
            take = min(end, int(self._starts[doc + 1])) - pos
            if take > 0:
                out.append(np.asarray(self._dataset.get(doc, offset=offset, length=take)))
            pos += take
            doc += 1
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


class _Ul2Sampler:
    """Shared set-up: UL2 config, specials and windows of a token stream."""

    def __init__(self, dataset: Any, tokenizer: Any, *, seq_len: int, seed: int,
                 mixture: tuple[tuple[str, float], ...], span_noise_density: float,
                 span_mean_length: float, span_bidirectional_prefix: bool, what: str) -> None:
        if not 0 <= seed < 2**63:
            raise ValueError(f"{what}: seed must be in [0, 2**63), got {seed}")
        self.seed = seed
        self.config = Ul2Config(seq_len=seq_len, mixture=tuple(mixture),
                                span_noise_density=span_noise_density,
                                span_mean_length=span_mean_length,
                                span_bidirectional_prefix=span_bidirectional_prefix)
        self.specials = Ul2Specials.from_tokenizer(tokenizer)
        self.probabilities = self.config.probabilities
        if self.probabilities[2] > 0 and self.config.max_spans() > self.specials.num_sentinels:
            raise ValueError(f"{what}: seq_len={seq_len} needs {self.config.max_spans()} "
                             f"sentinels, tokenizer has {self.specials.num_sentinels}")
        self.stream = TokenStream(dataset)
        self.window_len = seq_len - 1
        self.num_windows = self.stream.total // self.window_len
        if self.num_windows == 0:
            raise ValueError(f"{what}: dataset has {self.stream.total} tokens, fewer than one "
                             f"window of seq_len - 1 = {self.window_len}")

    def _example(self, window: int, rng: np.random.Generator,
                 denoiser: int | None = None) -> Example:
        if denoiser is None:
            denoiser = choose_denoiser(rng, self.probabilities)
        raw = self.stream.window(window * self.window_len, self.window_len)
        return make_example(denoiser, raw, self.specials, self.config, rng)


class Ul2BatchSource(_Ul2Sampler):
    """Global and per-rank UL2 batches as pure functions of the step (rules in module doc)."""

    def __init__(self, train_dataset: Any, tokenizer: Any, *, seq_len: int,
                 global_batch_size: int, seed: int,
                 mixture: tuple[tuple[str, float], ...] = DEFAULT_MIXTURE,
                 span_noise_density: float = 0.15, span_mean_length: float = 3.0,
                 span_bidirectional_prefix: bool = True) -> None:
        if global_batch_size < 1:
            raise ValueError(f"Ul2BatchSource: global_batch_size must be >= 1, "
                             f"got {global_batch_size}")
        super().__init__(train_dataset, tokenizer, seq_len=seq_len, seed=seed, mixture=mixture,
                         span_noise_density=span_noise_density,
                         span_mean_length=span_mean_length,
                         span_bidirectional_prefix=span_bidirectional_prefix,
                         what="Ul2BatchSource")
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self._permutation = lru_cache(maxsize=2)(self._make_permutation)

    @property
    def samples_per_epoch(self) -> int:
        return self.num_windows

    def _make_permutation(self, epoch: int) -> np.ndarray:
        return _rng(self.seed, _PERM, epoch).permutation(self.num_windows)

    def sample(self, n: int) -> Example:
        """Global sample ``n`` (= ``step * global_batch_size + row``)."""
        if n < 0:
            raise ValueError(f"sample index must be >= 0, got {n}")
        epoch, i = divmod(n, self.num_windows)
        window = int(self._permutation(epoch)[i])
        return self._example(window, _rng(self.seed, _SAMPLE, n))

    def rows(self, step: int, rows: Sequence[int]) -> Batch:
        """The given rows of global batch ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if any(not 0 <= r < self.global_batch_size for r in rows):
            raise ValueError(f"rows {list(rows)} outside [0, {self.global_batch_size})")
        base = step * self.global_batch_size
        return collate([self.sample(base + r) for r in rows], self.seq_len)

    def global_batch(self, step: int) -> Batch:
        return self.rows(step, range(self.global_batch_size))

    def micro_batch(self, step: int, *, dp_rank: int, dp_size: int, micro_batch_size: int,
                    micro_index: int) -> Batch:
        """Rows ``(micro_index * dp_size + dp_rank) * micro_batch_size + [0, micro_batch_size)``."""
        if dp_size < 1 or micro_batch_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"micro_batch: bad dp_rank={dp_rank} / dp_size={dp_size} / "
                             f"micro_batch_size={micro_batch_size}")
        per_step = dp_size * micro_batch_size
        if self.global_batch_size % per_step:
            raise ValueError(f"micro_batch: global_batch_size={self.global_batch_size} is not "
                             f"divisible by dp_size * micro_batch_size = {per_step}")
        num_micro = self.global_batch_size // per_step
        if not 0 <= micro_index < num_micro:
            raise ValueError(f"micro_batch: micro_index={micro_index} outside [0, {num_micro})")
        first = (micro_index * dp_size + dp_rank) * micro_batch_size
        return self.rows(step, range(first, first + micro_batch_size))


def apportion(num: int, probabilities: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``num``, proportional to ``probabilities`` (largest remainder),
    with at least 1 for every positive probability."""
    p = np.asarray(probabilities, dtype=np.float64)
    positive = p > 0
    if num < int(positive.sum()):
        raise ValueError(f"need at least {int(positive.sum())} samples to cover every denoiser, "
                         f"got {num}")
    exact = p / p.sum() * num
    counts = np.floor(exact).astype(np.int64)
    counts[positive & (counts == 0)] = 1
    for i in np.argsort(-(exact - np.floor(exact)), kind="stable"):
        if counts.sum() >= num:
            break
        if positive[i]:
            counts[i] += 1
    while counts.sum() > num:  # only possible after the >= 1 bumps
        counts[int(np.argmax(counts))] -= 1
    return counts


def validation_batches(valid_dataset: Any, tokenizer: Any, *, seq_len: int, num_samples: int,
                       batch_size: int, seed: int,
                       mixture: tuple[tuple[str, float], ...] = DEFAULT_MIXTURE,
                       span_noise_density: float = 0.15, span_mean_length: float = 3.0,
                       span_bidirectional_prefix: bool = True) -> list[Batch]:
    """A fixed held-out set of ``num_samples`` examples in batches of ``batch_size`` (the last
    batch may be smaller), covering every denoiser in the mixture's proportions."""
    if batch_size < 1:
        raise ValueError(f"validation_batches: batch_size must be >= 1, got {batch_size}")
    sampler = _Ul2Sampler(valid_dataset, tokenizer, seq_len=seq_len, seed=seed, mixture=mixture,
                          span_noise_density=span_noise_density,
                          span_mean_length=span_mean_length,
                          span_bidirectional_prefix=span_bidirectional_prefix,
                          what="validation_batches")
    counts = apportion(num_samples, sampler.probabilities)
    denoisers = np.repeat(np.arange(len(DENOISER_NAMES)), counts)
    denoisers = _rng(seed, _VALID_ORDER).permutation(denoisers)
    w = sampler.num_windows
    examples = [
        sampler._example(i * w // num_samples if num_samples <= w else i % w,
                         _rng(seed, _VALID_SAMPLE, i), int(denoisers[i]))
        for i in range(num_samples)
    ]
    return [collate(examples[i:i + batch_size], seq_len)
            for i in range(0, num_samples, batch_size)]
