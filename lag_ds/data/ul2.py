"""UL2 mixture of denoisers for a decoder-only model, as pure numpy functions.

Why: the LAG paper's UL2 run trains a decoder-only LM on a mixture of 60 % causal LM, 20 %
prefix LM and 20 % span corruption. Every function here is a pure function of its inputs and a
``np.random.Generator``, so the data order can be replayed exactly from (seed, sample index).

Exact parameters and layouts (``S`` = ``seq_len``; each example is first laid out as a
"full" sequence ``F`` of ``S + 1`` ids, then ``tokens = F[:S]``, ``labels = F[1:]`` and
``loss_mask[t] = 1`` iff ``F[t+1]`` is a target; positions after the example are ``pad``)::

  causal (id 0, mode [CLM]):  [BOS][CLM] x_1 ... x_n                       n = S - 1
      targets: x_1..x_n (the mode token is input only, never predicted); prefix_len = 0.
  prefix (id 1, mode [S2S]):  [BOS][S2S] p_1..p_k [SEP] c_1..c_m [EOS]     n = k + m = S - 3
      k ~ Uniform{1, ..., n-1} (``rng.integers(1, n)``), so m >= 1;
      targets: c_1..c_m and EOS; prefix_len = k + 3 (BOS, mode, prefix, SEP attend
      bidirectionally).
  span (id 2, mode [NLU]):    [BOS][NLU] inputs [SEP] targets [EOS]
      T5 "R" denoiser: noise density r = 0.15, mean span length mu = 3.0, noise mask from
      :func:`random_spans_noise_mask` (T5's algorithm, spans start with non-noise);
      inputs = raw tokens with noise span i replaced by sentinel i;
      targets = sentinel 0, span 0, sentinel 1, span 1, ..., sentinel K-1, span K-1;
      sentinel i = vocab_size - 1 - i; targets and EOS carry loss;
      prefix_len = len(inputs) + 3 if ``span_bidirectional_prefix`` (default) else 0.
      Raw length n = the largest n with n + 2 K(n) + 4 <= S + 1, K(n) = number of spans
      (T5's ``compute_input_and_target_lengths`` for a single packed sequence); the few
      leftover positions are padding.

Windows from the token stream are used as is (documents are joined by their EOS; there is no
masking across document boundaries, as in Megatron GPT pretraining).

Attention (:func:`attention_mask`) follows megatron-core: ``True`` = masked out. Position
``q`` may attend to ``k`` iff ``k <= q`` or both ``q, k < prefix_len``. Padding positions are
just causal (they carry no loss).

Rounding: ``round`` is numpy's (half to even), as ``tf.round`` in T5.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch

DENOISER_NAMES: tuple[str, ...] = ("causal", "prefix", "span")
CAUSAL, PREFIX, SPAN = 0, 1, 2
DENOISER_MODE_TOKENS: dict[str, str] = {"causal": "[CLM]", "prefix": "[S2S]", "span": "[NLU]"}
DEFAULT_MIXTURE: tuple[tuple[str, float], ...] = (("causal", 0.6), ("prefix", 0.2), ("span", 0.2))


class _TokenizerLike(Protocol):
    vocab_size: int
    num_sentinels: int
    bos_id: int
    eos_id: int
    pad_id: int
    sep_id: int

    def mode_id(self, name: str) -> int: ...


@dataclass(frozen=True, kw_only=True)
class Ul2Specials:
    """The special token ids the denoisers write (taken from a tokenizer or given by hand)."""

    bos: int
    eos: int
    pad: int
    sep: int
    modes: tuple[int, int, int]  # mode token id per denoiser, indexed like DENOISER_NAMES
    vocab_size: int  # sentinel j = vocab_size - 1 - j
    num_sentinels: int

    def sentinel(self, j: int) -> int:
        if not 0 <= j < self.num_sentinels:
            raise ValueError(f"sentinel index {j} outside [0, {self.num_sentinels})")
        return self.vocab_size - 1 - j

    @classmethod
    def from_tokenizer(cls, tok: "_TokenizerLike | Ul2Specials") -> "Ul2Specials":
        if isinstance(tok, Ul2Specials):
            return tok
        modes = tuple(tok.mode_id(DENOISER_MODE_TOKENS[n]) for n in DENOISER_NAMES)
        return cls(bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id, sep=tok.sep_id,
                   modes=modes, vocab_size=tok.vocab_size,  # type: ignore[arg-type]
                   num_sentinels=tok.num_sentinels)


@dataclass(frozen=True, kw_only=True)
class Ul2Config:
    """Sequence length, denoiser mixture and span-corruption parameters."""

    seq_len: int
    mixture: tuple[tuple[str, float], ...] = DEFAULT_MIXTURE  # (denoiser name, probability)
    span_noise_density: float = 0.15  # r
    span_mean_length: float = 3.0  # mu
    span_bidirectional_prefix: bool = True  # inputs+[SEP] attend bidirectionally

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise ValueError(f"Ul2Config.seq_len must be >= 8, got {self.seq_len}")
        names = [n for n, _ in self.mixture]
        if len(set(names)) != len(names) or not set(names) <= set(DENOISER_NAMES):
            raise ValueError(f"Ul2Config.mixture names must be distinct, from {DENOISER_NAMES}:"
                             f" {self.mixture}")
        probs = [p for _, p in self.mixture]
        if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"Ul2Config.mixture probabilities must be >= 0 and sum to 1: "
                             f"{self.mixture}")
        if not 0.0 < self.span_noise_density < 1.0 or self.span_mean_length < 1.0:
            raise ValueError("Ul2Config: need 0 < span_noise_density < 1 and "
                             f"span_mean_length >= 1, got {self.span_noise_density}, "
                             f"{self.span_mean_length}")

    @property
    def probabilities(self) -> np.ndarray:
        """Probability of each denoiser, indexed like DENOISER_NAMES (float64[3])."""
        probs = np.zeros(len(DENOISER_NAMES))
        for name, p in self.mixture:
            probs[DENOISER_NAMES.index(name)] = p
        return probs

    def raw_length(self, denoiser: int) -> int:
        """Raw stream tokens one example of ``denoiser`` consumes (see module docstring)."""
        if denoiser == CAUSAL:
            return self.seq_len - 1
        if denoiser == PREFIX:
            return self.seq_len - 3
        if denoiser == SPAN:
            return span_raw_length(self.seq_len, self.span_noise_density, self.span_mean_length)
        raise ValueError(f"unknown denoiser {denoiser}")

    def max_spans(self) -> int:
        """Number of sentinels a span-corruption example of this config uses."""
        n = self.raw_length(SPAN)
        return num_noise_spans(n, self.span_noise_density, self.span_mean_length)


@dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int64[S]
    labels: np.ndarray  # int64[S], labels[t] = token to predict at position t
    loss_mask: np.ndarray  # float32[S]
    prefix_len: int  # leading positions with bidirectional attention (0 = causal)
    denoiser: int  # index into DENOISER_NAMES


# ----------------------------------------------------------------------------- noise mask


def num_noise_tokens(length: int, noise_density: float) -> int:
    length = max(length, 2)
    return min(max(int(np.round(length * noise_density)), 1), length - 1)


def num_noise_spans(length: int, noise_density: float, mean_noise_span_length: float) -> int:
    noise = num_noise_tokens(length, noise_density)
    return max(int(np.round(noise / mean_noise_span_length)), 1)


def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of ``num_items`` into ``num_segments`` parts >= 1."""
    first_in_segment = (np.arange(num_items - 1) < num_segments - 1).astype(np.int64)
    rng.shuffle(first_in_segment)
    segment_id = np.cumsum(np.concatenate([[0], first_in_segment]))
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """T5's ``random_spans_noise_mask``: bool[length], True = noise, first span non-noise."""
    if noise_density == 0.0:
        return np.zeros(length, dtype=bool)
    orig_length, length = length, max(length, 2)
    noise = num_noise_tokens(length, noise_density)
    spans = num_noise_spans(length, noise_density, mean_noise_span_length)
    nonnoise = length - noise
    if spans > min(noise, nonnoise):
        raise ValueError(f"random_spans_noise_mask: {spans} spans do not fit {noise} noise and "
                         f"{nonnoise} non-noise tokens (length={length}, "
                         f"noise_density={noise_density}, mean={mean_noise_span_length})")
    noise_lengths = _random_segmentation(noise, spans, rng)
    nonnoise_lengths = _random_segmentation(nonnoise, spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    indicator = np.zeros(length, dtype=np.int64)
    indicator[span_starts] = 1
    is_noise = np.cumsum(indicator) % 2 == 1
    return is_noise[:orig_length]


@lru_cache(maxsize=64)
def span_raw_length(seq_len: int, noise_density: float, mean_noise_span_length: float) -> int:
    """Largest raw length n with n + 2 K(n) + 4 <= seq_len + 1 (K = number of noise spans)."""
    def total(n: int) -> int:  # BOS, mode, inputs, SEP, targets, EOS
        return n + 2 * num_noise_spans(n, noise_density, mean_noise_span_length) + 4

    n = seq_len - 5
    while n >= 2 and total(n) > seq_len + 1:
        n -= 1
    if n < 2:
        raise ValueError(f"seq_len={seq_len} is too short for a span-corruption example")
    return n


# ----------------------------------------------------------------------------- examples


def _finish(full: list[int] | np.ndarray, is_target: np.ndarray, seq_len: int, pad: int,
            prefix_len: int, denoiser: int) -> Example:
    """Pad the full sequence to S+1 and shift it into tokens/labels/loss_mask."""
    n = len(full)
    if n > seq_len + 1:
        raise ValueError(f"example of length {n} does not fit seq_len={seq_len}")
    f = np.full(seq_len + 1, pad, dtype=np.int64)
    f[:n] = full
    target = np.zeros(seq_len + 1, dtype=bool)
    target[:n] = is_target
    return Example(tokens=f[:-1].copy(), labels=f[1:].copy(),
                   loss_mask=target[1:].astype(np.float32), prefix_len=prefix_len,
                   denoiser=denoiser)


def _check_raw(raw: np.ndarray, lo: int, hi: int, what: str) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.int64)
    if raw.ndim != 1 or not lo <= len(raw) <= hi:
        raise ValueError(f"{what}: raw tokens must be 1-D with length in [{lo}, {hi}], "
                         f"got shape {raw.shape}")
    return raw


def causal_example(raw: np.ndarray, specials: Ul2Specials, seq_len: int) -> Example:
    """``[BOS][CLM] raw``; loss on every raw token."""
    raw = _check_raw(raw, 1, seq_len - 1, "causal_example")
    full = np.concatenate([[specials.bos, specials.modes[CAUSAL]], raw])
    is_target = np.concatenate([[False, False], np.ones(len(raw), dtype=bool)])
    return _finish(full, is_target, seq_len, specials.pad, 0, CAUSAL)


def prefix_lm_example(raw: np.ndarray, specials: Ul2Specials, seq_len: int,
                      prefix_tokens: int) -> Example:
    """``[BOS][S2S] raw[:k] [SEP] raw[k:] [EOS]`` with ``k = prefix_tokens``."""
    raw = _check_raw(raw, 2, seq_len - 3, "prefix_lm_example")
    k = prefix_tokens
    if not 1 <= k <= len(raw) - 1:
        raise ValueError(f"prefix_lm_example: prefix_tokens={k} outside [1, {len(raw) - 1}]")
    full = np.concatenate([[specials.bos, specials.modes[PREFIX]], raw[:k], [specials.sep],
                           raw[k:], [specials.eos]])
    is_target = np.zeros(len(full), dtype=bool)
    is_target[k + 3:] = True  # continuation and EOS
    return _finish(full, is_target, seq_len, specials.pad, k + 3, PREFIX)


def span_corruption_example(raw: np.ndarray, specials: Ul2Specials, seq_len: int,
                            noise_mask: np.ndarray, *, bidirectional_prefix: bool = True
                            ) -> Example:
    """``[BOS][NLU] inputs [SEP] targets [EOS]`` for a given noise mask (see module docstring)."""
    raw = _check_raw(raw, 2, seq_len - 5, "span_corruption_example")
    noise_mask = np.asarray(noise_mask, dtype=bool)
    if noise_mask.shape != raw.shape or not noise_mask.any():
        raise ValueError("span_corruption_example: noise_mask must match raw and be non-empty")
    starts = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])
    span_id = np.cumsum(starts) - 1  # index of the span each noise token belongs to
    inputs: list[int] = []
    targets: list[int] = []
    for i, tok in enumerate(raw.tolist()):
        if not noise_mask[i]:
            inputs.append(tok)
            continue
        if starts[i]:
            sentinel = specials.sentinel(int(span_id[i]))
            inputs.append(sentinel)
            targets.append(sentinel)
        targets.append(tok)
    full = [specials.bos, specials.modes[SPAN], *inputs, specials.sep, *targets, specials.eos]
    is_target = np.zeros(len(full), dtype=bool)
    is_target[len(inputs) + 3:] = True  # targets and EOS
    prefix_len = len(inputs) + 3 if bidirectional_prefix else 0
    return _finish(full, is_target, seq_len, specials.pad, prefix_len, SPAN)


def choose_denoiser(rng: np.random.Generator, probabilities: np.ndarray) -> int:
    """Draw a denoiser index with one ``rng.random()``."""
    cdf = np.cumsum(probabilities)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def make_example(denoiser: int, raw: np.ndarray, specials: Ul2Specials, config: Ul2Config,
                 rng: np.random.Generator) -> Example:
    """Build one example of ``denoiser`` from ``raw[:config.raw_length(denoiser)]``."""
    raw = np.asarray(raw, dtype=np.int64)[: config.raw_length(denoiser)]
    if denoiser == CAUSAL:
        return causal_example(raw, specials, config.seq_len)
    if denoiser == PREFIX:
        k = int(rng.integers(1, len(raw)))
        return prefix_lm_example(raw, specials, config.seq_len, k)
    if denoiser == SPAN:
        mask = random_spans_noise_mask(len(raw), config.span_noise_density,
                                       config.span_mean_length, rng)
        return span_corruption_example(raw, specials, config.seq_len, mask,
                                       bidirectional_prefix=config.span_bidirectional_prefix)
    raise ValueError(f"unknown denoiser {denoiser}")


# ----------------------------------------------------------------------------- attention


def attention_mask(prefix_lens: torch.Tensor | np.ndarray | list[int],
                   seq_len: int) -> torch.Tensor:
    """Bool [B, 1, S, S], True = masked out: causal plus a bidirectional prefix block per row."""
    p = torch.as_tensor(np.asarray(prefix_lens), dtype=torch.int64).reshape(-1, 1, 1, 1)
    pos = torch.arange(seq_len)
    q, k = pos.view(1, 1, -1, 1), pos.view(1, 1, 1, -1)
    allowed = (k <= q) | ((q < p) & (k < p))
    return ~allowed
