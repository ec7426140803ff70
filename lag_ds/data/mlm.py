"""BERT masked-LM batches whose content is a pure function of (seed, global step).

Why: LAG compares candidates that resume from checkpoints with different data-parallel layouts,
so, as for UL2 (:mod:`lag_ds.data.batches`), batch ``s`` must not depend on iterator state. The
same window/permutation rules are used; only the example builder differs.

Exact rules (``S`` = ``seq_len``, ``G`` = global batch size, ``L = S - 2`` = window length):

* example layout ``[CLS] x_1 ... x_L [SEP]`` (one segment, no next-sentence prediction, as
  RoBERTa; the paper's appendix A only names Devlin et al.'s data), all positions real (no
  padding: windows come from the concatenated token stream, documents joined by their EOS);
* masking (Devlin et al. 2018, section 3.1): of the ``L`` text positions exactly
  ``max(1, round(0.15 L))`` are chosen uniformly without replacement (``rng.choice``); then one
  ``rng.random()`` per chosen position: ``< 0.8`` -> ``[MASK]``, ``< 0.9`` -> a random ordinary
  piece drawn uniformly from ``[first_ordinary, sp_vocab_size)`` (``rng.integers``), else the
  token is kept. Loss is on the chosen positions only; ``[CLS]``/``[SEP]`` are never chosen;
* global sample ``n = step * G + j`` uses window ``perm_e[n % W]`` of epoch ``e = n // W``,
  ``perm_e`` drawn from ``SeedSequence(seed, spawn_key=(0, e))``; its masking randomness from
  ``SeedSequence(seed, spawn_key=(1, n))`` (the UL2 keys, so both families read the same
  windows in the same order for the same ``data_seed`` when ``L`` is equal);
* micro batches: rows ``(m * D + r) * b + [0, b)``, as for UL2;
* validation: ``num_samples`` fixed examples, sample ``i`` from validation window
  ``i * W // num_samples`` with randomness ``SeedSequence(seed, spawn_key=(3, i))``.

Example::

    source = MlmBatchSource(train_tokens, MlmSpecials.from_tokenizer(tok), seq_len=128,
                            global_batch_size=256, seed=1)
    batch = source.micro_batch(step, dp_rank=0, dp_size=1, micro_batch_size=8, micro_index=0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from lag_ds.data.batches import TokenStream, _rng

MASK_PROB = 0.15
REPLACE_PROBS = (0.8, 0.1, 0.1)  # [MASK] / random piece / keep
KIND_NAMES = ("mask", "random", "keep")
"""Kind of a chosen position (1 + index here; 0 = not chosen): the validation breakdown."""
_PERM, _SAMPLE, _VALID_SAMPLE = 0, 1, 3
CLS_TOKEN, MASK_TOKEN = "[CLS]", "[MASK]"


@dataclass(frozen=True, kw_only=True)
class MlmSpecials:
    cls: int
    sep: int
    mask: int
    first_ordinary: int
    """Lowest id a random replacement may take (above pad/unk/bos/eos)."""
    num_ordinary_end: int
    """One past the highest ordinary piece id (the SentencePiece vocabulary size)."""

    @classmethod
    def from_tokenizer(cls, tok: Any) -> "MlmSpecials":
        """A tokenizer built with ``mode_tokens=("[CLS]", "[MASK]")`` (see bert_mlm.tokenizer)."""
        first = max(tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) + 1
        return cls(cls=tok.mode_id(CLS_TOKEN), sep=tok.sep_id, mask=tok.mode_id(MASK_TOKEN),
                   first_ordinary=first, num_ordinary_end=tok.sp_vocab_size)


@dataclass(frozen=True)
class MlmBatch:
    tokens: torch.Tensor  # int64 [B, S], after masking
    labels: torch.Tensor  # int64 [B, S], the original tokens
    loss_mask: torch.Tensor  # float32 [B, S], 1 at the chosen positions
    padding_mask: torch.Tensor  # int64 [B, S], 1 = real token (BertModel's attention_mask)
    kind: torch.Tensor  # int64 [B, S], 0 = not chosen, 1 + index into KIND_NAMES

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MlmBatch":
        return MlmBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                           for f in fields(self)})

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])


def mask_example(raw: np.ndarray, specials: MlmSpecials, rng: np.random.Generator,
                 mask_prob: float = MASK_PROB) -> tuple[np.ndarray, ...]:
    """``(tokens, labels, loss_mask, kind)`` of ``[CLS] raw [SEP]`` with BERT's 80/10/10 rule."""
    raw = np.asarray(raw, dtype=np.int64)
    n = len(raw)
    labels = np.concatenate([[specials.cls], raw, [specials.sep]]).astype(np.int64)
    tokens = labels.copy()
    num = max(1, int(np.round(mask_prob * n)))
    chosen = 1 + rng.choice(n, size=num, replace=False)
    u = rng.random(num)
    kind = np.zeros(n + 2, dtype=np.int64)
    to_mask = u < REPLACE_PROBS[0]
    to_random = (u >= REPLACE_PROBS[0]) & (u < sum(REPLACE_PROBS[:2]))
    tokens[chosen[to_mask]] = specials.mask
    tokens[chosen[to_random]] = rng.integers(specials.first_ordinary, specials.num_ordinary_end,
                                             size=int(to_random.sum()))
    kind[chosen] = np.where(to_mask, 1, np.where(to_random, 2, 3))
    loss_mask = (kind > 0).astype(np.float32)
    return tokens, labels, loss_mask, kind


def collate_mlm(examples: Sequence[tuple[np.ndarray, ...]]) -> MlmBatch:
    tokens, labels, loss_mask, kind = (np.stack(x) for x in zip(*examples))
    return MlmBatch(tokens=torch.from_numpy(tokens), labels=torch.from_numpy(labels),
                    loss_mask=torch.from_numpy(loss_mask),
                    padding_mask=torch.ones(tokens.shape, dtype=torch.int64),
                    kind=torch.from_numpy(kind))


class _MlmSampler:
    def __init__(self, dataset: Any, specials: MlmSpecials, *, seq_len: int, seed: int,
                 what: str) -> None:
        if not 0 <= seed < 2**63:
            raise ValueError(f"{what}: seed must be in [0, 2**63), got {seed}")
        if seq_len < 4:
            raise ValueError(f"{what}: seq_len must be >= 4, got {seq_len}")
        self.seed, self.seq_len, self.specials = seed, seq_len, specials
        self.stream = TokenStream(dataset)
        self.window_len = seq_len - 2
        self.num_windows = self.stream.total // self.window_len
        if self.num_windows == 0:
            raise ValueError(f"{what}: dataset has {self.stream.total} tokens, fewer than one "
                             f"window of seq_len - 2 = {self.window_len}")

    def _example(self, window: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        raw = self.stream.window(window * self.window_len, self.window_len)
        return mask_example(raw, self.specials, rng)


class MlmBatchSource(_MlmSampler):
    """Global and per-rank MLM batches as pure functions of the step (rules in module doc)."""

    def __init__(self, train_dataset: Any, specials: MlmSpecials, *, seq_len: int,
                 global_batch_size: int, seed: int) -> None:
        if global_batch_size < 1:
            raise ValueError(f"MlmBatchSource: global_batch_size must be >= 1, "
                             f"got {global_batch_size}")
        super().__init__(train_dataset, specials, seq_len=seq_len, seed=seed,
                         what="MlmBatchSource")
        self.global_batch_size = global_batch_size
        self._permutation = lru_cache(maxsize=2)(self._make_permutation)

    def _make_permutation(self, epoch: int) -> np.ndarray:
        return _rng(self.seed, _PERM, epoch).permutation(self.num_windows)

    def sample(self, n: int) -> tuple[np.ndarray, ...]:
        if n < 0:
            raise ValueError(f"sample index must be >= 0, got {n}")
        epoch, i = divmod(n, self.num_windows)
        return self._example(int(self._permutation(epoch)[i]), _rng(self.seed, _SAMPLE, n))

    def rows(self, step: int, rows: Sequence[int]) -> MlmBatch:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if any(not 0 <= r < self.global_batch_size for r in rows):
            raise ValueError(f"rows {list(rows)} outside [0, {self.global_batch_size})")
        base = step * self.global_batch_size
        return collate_mlm([self.sample(base + r) for r in rows])

    def global_batch(self, step: int) -> MlmBatch:
        return self.rows(step, range(self.global_batch_size))

    def micro_batch(self, step: int, *, dp_rank: int, dp_size: int, micro_batch_size: int,
                    micro_index: int) -> MlmBatch:
        per_step = dp_size * micro_batch_size
        if dp_size < 1 or micro_batch_size < 1 or not 0 <= dp_rank < dp_size \
                or self.global_batch_size % per_step:
            raise ValueError(f"micro_batch: bad dp_rank={dp_rank} / dp_size={dp_size} / "
                             f"micro_batch_size={micro_batch_size} for global batch "
                             f"{self.global_batch_size}")
        if not 0 <= micro_index < self.global_batch_size // per_step:
            raise ValueError(f"micro_batch: micro_index={micro_index} out of range")
        first = (micro_index * dp_size + dp_rank) * micro_batch_size
        return self.rows(step, range(first, first + micro_batch_size))


def mlm_validation_batches(valid_dataset: Any, specials: MlmSpecials, *, seq_len: int,
                           num_samples: int, batch_size: int, seed: int) -> list[MlmBatch]:
    """A fixed held-out set of ``num_samples`` masked examples in batches of ``batch_size``."""
    if batch_size < 1 or num_samples < 1:
        raise ValueError(f"mlm_validation_batches: batch_size={batch_size} and "
                         f"num_samples={num_samples} must be >= 1")
    sampler = _MlmSampler(valid_dataset, specials, seq_len=seq_len, seed=seed,
                          what="mlm_validation_batches")
    w = sampler.num_windows
    examples = [sampler._example(i * w // num_samples if num_samples <= w else i % w,
                                 _rng(seed, _VALID_SAMPLE, i)) for i in range(num_samples)]
    return [collate_mlm(examples[i:i + batch_size]) for i in range(0, num_samples, batch_size)]
