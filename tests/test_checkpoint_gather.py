"""gather_full places every fragment where merge_tp would, for every TP split rule.

The reference is the old path (concatenate each rank's fragments, then ``merge_tp``); the cases
cover replicated, column-parallel (dim 0), row-parallel (dim 1) and GLU fc1 (two sub-parameters)
tensors at TP 1, 2 and 4, with fragments cut at random places, as ZeRO partitions cut them.
"""

from __future__ import annotations

import math

import pytest
import torch

from lag_ds.checkpoint.gather import gather_full
from lag_ds.checkpoint.megatron_layout import TpRule, merge_tp


def _fragments(shard: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
    flat = shard.reshape(-1)
    cuts = sorted(torch.randint(0, flat.numel() + 1, (3,), generator=gen).tolist())
    bounds = [0, *cuts, flat.numel()]
    return [flat[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("rule", [TpRule(None), TpRule(0), TpRule(1), TpRule(0, 2)],
                         ids=["replicated", "column", "row", "glu-fc1"])
def test_gather_full_equals_merge_tp(tp, rule):
    gen = torch.Generator().manual_seed(tp * 10 + (rule.cat_dim or 0) + rule.num_sub_params)
    local = (8, 6) if rule.cat_dim is None else (8, 12) if rule.cat_dim == 1 else (8, 6)
    shards = [torch.randn(local, generator=gen) for _ in range(tp)]
    if rule.cat_dim is None:
        shards = [shards[0].clone() for _ in range(tp)]
    frags = [_fragments(s, gen) for s in shards]
    expected = merge_tp([torch.cat(f).reshape(local) for f in frags], rule)
    got = gather_full(tuple(expected.shape), rule, [local] * tp, lambda r: iter(frags[r]))
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert got.is_contiguous() and got.untyped_storage().nbytes() == 4 * math.prod(got.shape)


def test_fragments_that_do_not_cover_the_shard_are_an_error():
    shard = torch.randn(4, 4)
    with pytest.raises(ValueError, match="fragments hold 8 elements, the shard has 16"):
        gather_full((4, 4), TpRule(0), [(4, 4)], lambda r: iter([shard.reshape(-1)[:8]]))
