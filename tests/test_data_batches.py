"""UL2 batches: pure function of (seed, step), DP/grad-accum invariance, fixed validation set."""

import numpy as np
import pytest
import torch

from lag_ds.data.batches import Batch, TokenStream, Ul2BatchSource, apportion, validation_batches
from lag_ds.data.ul2 import DENOISER_NAMES, Ul2Specials

SP = Ul2Specials(bos=2, eos=3, pad=0, sep=200, modes=(201, 202, 203), vocab_size=300,
                 num_sentinels=96)
S, G = 32, 8


def _docs(seed: int, n: int = 40, lo: int = 4, hi: int = 200) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(lo, hi, size=int(rng.integers(5, 40))), SP.eos)
            for _ in range(n)]


TRAIN = _docs(0)


def _source(**kw) -> Ul2BatchSource:
    args = dict(seq_len=S, global_batch_size=G, seed=1234)
    args.update(kw)
    return Ul2BatchSource(TRAIN, SP, **args)


def _assert_equal(a: Batch, b: Batch) -> None:
    for name in ("tokens", "labels", "loss_mask", "attention_mask", "position_ids", "denoiser"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _cat(batches: list[Batch]) -> Batch:
    return Batch(*(torch.cat([getattr(b, f) for b in batches]) for f in
                   ("tokens", "labels", "loss_mask", "attention_mask", "position_ids",
                    "denoiser")))


def test_batch_shapes_and_dtypes() -> None:
    b = _source().global_batch(0)
    assert b.tokens.shape == b.labels.shape == b.loss_mask.shape == (G, S)
    assert b.attention_mask.shape == (G, 1, S, S) and b.attention_mask.dtype == torch.bool
    assert b.tokens.dtype == b.labels.dtype == b.position_ids.dtype == torch.int64
    assert b.loss_mask.dtype == torch.float32 and b.denoiser.shape == (G,)
    assert torch.equal(b.position_ids[3], torch.arange(S))
    assert torch.equal(b.labels[:, :-1], b.tokens[:, 1:])


def test_global_batch_is_a_pure_function_of_step() -> None:
    a, b = _source(), _source()
    for step in (0, 3, 17, 1000):
        _assert_equal(a.global_batch(step), b.global_batch(step))
    _assert_equal(a.global_batch(5), _source().global_batch(5))  # fresh instance, no history
    assert not torch.equal(a.global_batch(0).tokens, a.global_batch(1).tokens)
    assert not torch.equal(_source(seed=1).global_batch(0).tokens, a.global_batch(0).tokens)


@pytest.mark.parametrize("dp_size,mbs", [(1, 8), (1, 2), (2, 4), (2, 1), (4, 2), (8, 1)])
def test_micro_batches_union_is_the_global_batch(dp_size: int, mbs: int) -> None:
    src = _source()
    for step in (0, 7):
        parts = [src.micro_batch(step, dp_rank=r, dp_size=dp_size, micro_batch_size=mbs,
                                 micro_index=m)
                 for m in range(G // (dp_size * mbs)) for r in range(dp_size)]
        _assert_equal(_cat(parts), src.global_batch(step))


def test_micro_batch_rejects_bad_layouts() -> None:
    src = _source()
    with pytest.raises(ValueError, match="divisible"):
        src.micro_batch(0, dp_rank=0, dp_size=3, micro_batch_size=1, micro_index=0)
    with pytest.raises(ValueError, match="micro_index"):
        src.micro_batch(0, dp_rank=0, dp_size=2, micro_batch_size=2, micro_index=2)
    with pytest.raises(ValueError, match="dp_rank"):
        src.micro_batch(0, dp_rank=2, dp_size=2, micro_batch_size=2, micro_index=0)


def test_each_epoch_visits_every_window_once() -> None:
    src = _source(mixture=(("causal", 1.0),))
    w = src.num_windows
    stream = TokenStream(TRAIN)
    windows = {stream.window(i * (S - 1), S - 1).tobytes() for i in range(w)}
    for epoch in (0, 1):
        seen = [src.sample(epoch * w + i) for i in range(w)]
        raws = [np.append(e.tokens[2:], e.labels[-1]).tobytes() for e in seen]
        assert set(raws) == windows and len(set(raws)) == w
    first = [src.sample(i).tokens.tobytes() for i in range(w)]
    second = [src.sample(w + i).tokens.tobytes() for i in range(w)]
    assert first != second  # re-permuted per epoch


def test_mixture_is_used() -> None:
    src = _source()
    d = torch.cat([src.global_batch(s).denoiser for s in range(60)])
    freq = torch.bincount(d, minlength=3).float() / len(d)
    assert torch.allclose(freq, torch.tensor([0.6, 0.2, 0.2]), atol=0.08)
    only_span = _source(mixture=(("span", 1.0),)).global_batch(0)
    assert torch.all(only_span.denoiser == DENOISER_NAMES.index("span"))
    assert torch.all(only_span.tokens[:, 1] == SP.modes[2])


def test_too_small_dataset_and_sentinels_are_errors() -> None:
    with pytest.raises(ValueError, match="window"):
        Ul2BatchSource([np.arange(4, 10)], SP, seq_len=S, global_batch_size=2, seed=0)
    few = Ul2Specials(bos=2, eos=3, pad=0, sep=200, modes=(201, 202, 203), vocab_size=210,
                      num_sentinels=2)
    with pytest.raises(ValueError, match="sentinels"):
        Ul2BatchSource(TRAIN, few, seq_len=256, global_batch_size=2, seed=0)


def test_token_stream_windows_cross_documents() -> None:
    docs = [np.array([5, 6, 3]), np.array([7, 3]), np.array([8, 9, 10, 3])]
    st = TokenStream(docs)
    assert st.total == 9
    assert st.window(1, 5).tolist() == [6, 3, 7, 3, 8]
    with pytest.raises(ValueError, match="outside"):
        st.window(6, 4)


def test_apportion() -> None:
    p = np.array([0.6, 0.2, 0.2])
    assert apportion(20, p).tolist() == [12, 4, 4]
    assert apportion(3, p).tolist() == [1, 1, 1]
    assert apportion(7, p).tolist() == [4, 2, 1]
    assert apportion(5, np.array([1.0, 0.0, 0.0])).tolist() == [5, 0, 0]
    with pytest.raises(ValueError, match="at least"):
        apportion(2, p)


def test_validation_set_is_fixed_and_covers_every_denoiser() -> None:
    valid = _docs(1, n=10, lo=100, hi=200)  # validation tokens live in [100, 200)
    kw = dict(seq_len=S, num_samples=10, batch_size=4, seed=5)
    a = validation_batches(valid, SP, **kw)
    b = validation_batches(valid, SP, **kw)
    assert [x.size for x in a] == [4, 4, 2]
    for x, y in zip(a, b):
        _assert_equal(x, y)
    den = torch.cat([x.denoiser for x in a])
    assert torch.bincount(den, minlength=3).tolist() == [6, 2, 2]
    # content comes from the validation stream only (raw ids >= 100 or specials/sentinels)
    toks = torch.cat([x.tokens for x in a])
    raw = toks[(toks > SP.eos) & (toks < SP.sep)]
    assert raw.numel() > 0 and bool((raw >= 100).all())
    other = validation_batches(valid, SP, **{**kw, "seed": 6})
    assert not torch.equal(torch.cat([x.tokens for x in other]), toks)
