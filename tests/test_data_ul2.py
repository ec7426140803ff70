"""UL2 denoisers: exact layouts on hand-made sequences, T5 noise-mask properties, masks."""

import numpy as np
import pytest
import torch

from lag_ds.data.ul2 import (
    CAUSAL,
    PREFIX,
    SPAN,
    Ul2Config,
    Ul2Specials,
    attention_mask,
    causal_example,
    choose_denoiser,
    make_example,
    num_noise_spans,
    num_noise_tokens,
    prefix_lm_example,
    random_spans_noise_mask,
    span_corruption_example,
    span_raw_length,
)

# pad 0, bos 2, eos 3, [SEP] 100, modes [CLM] 101 / [S2S] 102 / [NLU] 103,
# sentinel j = 119 - j
SP = Ul2Specials(bos=2, eos=3, pad=0, sep=100, modes=(101, 102, 103), vocab_size=120,
                 num_sentinels=10)


def _runs(mask: np.ndarray) -> list[tuple[bool, int]]:
    runs: list[tuple[bool, int]] = []
    for m in mask.tolist():
        if runs and runs[-1][0] == m:
            runs[-1] = (m, runs[-1][1] + 1)
        else:
            runs.append((m, 1))
    return runs


@pytest.mark.parametrize("length,noise,spans", [(100, 15, 5), (20, 3, 1), (10, 2, 1),
                                                (2, 1, 1), (1000, 150, 50), (57, 9, 3)])
def test_noise_mask_counts_and_shape(length: int, noise: int, spans: int) -> None:
    for seed in range(5):
        mask = random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(seed))
        assert mask.dtype == bool and mask.shape == (length,)
        assert int(mask.sum()) == noise
        runs = _runs(mask)
        assert runs[0][0] is False  # starts with non-noise
        assert runs[-1][0] is True  # T5 interleaving ends with a noise span
        assert sum(1 for m, _ in runs if m) == spans
        assert sum(1 for m, _ in runs if not m) == spans
        assert all(n >= 1 for _, n in runs)


def test_noise_mask_rounding_rules() -> None:
    # round(10 * 0.15) = round(1.5) = 2 (half to even); round(2 / 3) = 1
    assert num_noise_spans(10, 0.15, 3.0) == 1
    # noise clipped to >= 1 and <= length - 1
    assert random_spans_noise_mask(4, 0.01, 3.0, np.random.default_rng(0)).sum() == 1
    assert random_spans_noise_mask(4, 0.99, 3.0, np.random.default_rng(0)).sum() == 3
    assert random_spans_noise_mask(30, 0.0, 3.0, np.random.default_rng(0)).sum() == 0


def test_noise_mask_deterministic_per_seed() -> None:
    a = random_spans_noise_mask(200, 0.15, 3.0, np.random.default_rng(7))
    b = random_spans_noise_mask(200, 0.15, 3.0, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    others = [random_spans_noise_mask(200, 0.15, 3.0, np.random.default_rng(s)) for s in range(8)]
    assert len({m.tobytes() for m in others}) > 1


def test_noise_mask_too_many_spans_is_an_error() -> None:
    with pytest.raises(ValueError, match="spans"):
        random_spans_noise_mask(10, 0.9, 1.0, np.random.default_rng(0))


def test_span_corruption_exact_layout() -> None:
    raw = np.arange(10, 30)  # 10..29
    mask = np.zeros(20, dtype=bool)
    mask[[3, 4, 10, 18, 19]] = True  # spans: (13, 14), (20,), (28, 29)
    ex = span_corruption_example(raw, SP, 32, mask)
    s0, s1, s2 = 119, 118, 117
    inputs = [10, 11, 12, s0, 15, 16, 17, 18, 19, s1, 21, 22, 23, 24, 25, 26, 27, s2]
    targets = [s0, 13, 14, s1, 20, s2, 28, 29]
    full = [2, 103] + inputs + [100] + targets + [3] + [0, 0, 0]  # 33 = S + 1
    assert ex.tokens.tolist() == full[:32]
    assert ex.labels.tolist() == full[1:]
    expected_loss = [0.0] * 20 + [1.0] * 9 + [0.0] * 3  # from [SEP] up to the last target
    assert ex.loss_mask.tolist() == expected_loss
    assert ex.prefix_len == 21  # BOS, mode, 18 inputs, SEP
    assert ex.denoiser == SPAN
    assert ex.tokens.dtype == np.int64 and ex.loss_mask.dtype == np.float32
    causal_variant = span_corruption_example(raw, SP, 32, mask, bidirectional_prefix=False)
    assert causal_variant.prefix_len == 0
    assert causal_variant.tokens.tolist() == ex.tokens.tolist()


def test_prefix_lm_exact_layout() -> None:
    raw = np.arange(10, 20)
    ex = prefix_lm_example(raw, SP, 16, prefix_tokens=4)
    full = [2, 102, 10, 11, 12, 13, 100, 14, 15, 16, 17, 18, 19, 3, 0, 0, 0]
    assert ex.tokens.tolist() == full[:16]
    assert ex.labels.tolist() == full[1:]
    assert ex.loss_mask.tolist() == [0.0] * 6 + [1.0] * 7 + [0.0] * 3
    assert ex.prefix_len == 7 and ex.denoiser == PREFIX
    with pytest.raises(ValueError, match="prefix_tokens"):
        prefix_lm_example(raw, SP, 16, prefix_tokens=10)  # continuation must be non-empty


def test_causal_exact_layout() -> None:
    ex = causal_example(np.arange(10, 17), SP, 8)  # n = S - 1 = 7 fills the sequence
    assert ex.tokens.tolist() == [2, 101, 10, 11, 12, 13, 14, 15]
    assert ex.labels.tolist() == [101, 10, 11, 12, 13, 14, 15, 16]
    assert ex.loss_mask.tolist() == [0.0] + [1.0] * 7
    assert ex.prefix_len == 0 and ex.denoiser == CAUSAL
    short = causal_example(np.arange(10, 13), SP, 8)  # padded
    assert short.tokens.tolist() == [2, 101, 10, 11, 12, 0, 0, 0]
    assert short.loss_mask.tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="causal_example"):
        causal_example(np.arange(10, 18), SP, 8)


def test_span_raw_length_is_the_largest_that_fits() -> None:
    assert span_raw_length(32, 0.15, 3.0) == 27
    for s in range(8, 400, 7):
        n = span_raw_length(s, 0.15, 3.0)
        assert n + 2 * num_noise_spans(n, 0.15, 3.0) + 4 <= s + 1
        m = n + 1
        assert m + 2 * num_noise_spans(m, 0.15, 3.0) + 4 > s + 1


BIG = Ul2Specials(bos=2, eos=3, pad=0, sep=1000, modes=(1001, 1002, 1003), vocab_size=1200,
                  num_sentinels=100)


def _reconstruct_span(ex, n: int) -> list[int]:
    """Undo span corruption: put each sentinel's target span back into the inputs."""
    full = ex.tokens.tolist() + [int(ex.labels[-1])]
    sep = full.index(BIG.sep)
    inputs, targets = full[2:sep], full[sep + 1:]
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets:
        if t == BIG.eos:
            break
        if t >= 1100:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    assert list(spans) == [BIG.sentinel(j) for j in range(len(spans))]  # 0, 1, 2, ... in order
    out: list[int] = []
    for t in inputs:
        out.extend(spans[t] if t >= 1100 else [t])
    return out


@pytest.mark.parametrize("seq_len", [16, 33, 128, 512])
def test_make_example_invariants(seq_len: int) -> None:
    cfg = Ul2Config(seq_len=seq_len)
    raw = np.arange(4, 4 + seq_len)
    for seed in range(10):
        for d in (CAUSAL, PREFIX, SPAN):
            ex = make_example(d, raw, BIG, cfg, np.random.default_rng(seed))
            assert ex.tokens.shape == ex.labels.shape == ex.loss_mask.shape == (seq_len,)
            np.testing.assert_array_equal(ex.labels[:-1], ex.tokens[1:])  # next-token labels
            assert ex.tokens[0] == BIG.bos and ex.tokens[1] == BIG.modes[d]
            n = cfg.raw_length(d)
            if d == CAUSAL:
                assert ex.loss_mask.sum() == n == seq_len - 1
            elif d == PREFIX:
                assert n == seq_len - 3
                assert ex.loss_mask.sum() == n - (ex.prefix_len - 3) + 1  # continuation + EOS
                assert ex.tokens[ex.prefix_len - 1] == BIG.sep
                assert ex.labels[-1] == BIG.eos  # prefix LM fills the sequence exactly
            else:
                k = num_noise_spans(n, 0.15, 3.0)
                assert ex.loss_mask.sum() == num_noise_tokens(n, 0.15) + k + 1
                assert ex.tokens[ex.prefix_len - 1] == BIG.sep
                assert _reconstruct_span(ex, n) == list(range(4, 4 + n))
                assert n + 2 * k + 4 <= seq_len + 1
            assert np.all(ex.loss_mask[ex.labels == BIG.pad] == 0)  # no loss on padding


def test_choose_denoiser_follows_mixture() -> None:
    probs = Ul2Config(seq_len=16).probabilities
    np.testing.assert_allclose(probs, [0.6, 0.2, 0.2])
    rng = np.random.default_rng(0)
    counts = np.bincount([choose_denoiser(rng, probs) for _ in range(20000)], minlength=3)
    np.testing.assert_allclose(counts / 20000, [0.6, 0.2, 0.2], atol=0.015)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="mixture"):
        Ul2Config(seq_len=16, mixture=(("causal", 0.5), ("span", 0.4)))
    with pytest.raises(ValueError, match="mixture"):
        Ul2Config(seq_len=16, mixture=(("denoise", 1.0),))
    with pytest.raises(ValueError, match="seq_len"):
        Ul2Config(seq_len=4)


def test_attention_mask_elementwise() -> None:
    m = attention_mask([0, 3], 5)
    assert m.shape == (2, 1, 5, 5) and m.dtype == torch.bool
    T, F = True, False
    causal = [[F, T, T, T, T],
              [F, F, T, T, T],
              [F, F, F, T, T],
              [F, F, F, F, T],
              [F, F, F, F, F]]
    prefix3 = [[F, F, F, T, T],
               [F, F, F, T, T],
               [F, F, F, T, T],
               [F, F, F, F, T],
               [F, F, F, F, F]]
    assert m[0, 0].tolist() == causal
    assert m[1, 0].tolist() == prefix3
    assert attention_mask([1], 5)[0, 0].tolist() == causal  # prefix of 1 == causal


def test_random_segmentation_is_a_uniform_composition() -> None:
    from lag_ds.data.ul2 import _random_segmentation

    rng = np.random.default_rng(0)
    seen = [tuple(_random_segmentation(5, 2, rng).tolist()) for _ in range(4000)]
    assert set(seen) == {(1, 4), (2, 3), (3, 2), (4, 1)}  # all compositions of 5 into 2 parts
    freq = np.array([seen.count(c) for c in sorted(set(seen))]) / len(seen)
    np.testing.assert_allclose(freq, 0.25, atol=0.03)
