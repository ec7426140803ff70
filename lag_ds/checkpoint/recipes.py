"""Turn a ``GrowthPlan`` into per-tensor recipes: the one plan executor every writer consumes.

Why: the plan says which grown layer comes from which old layer and how it is initialised; a
writer needs, for each tensor of the grown checkpoint, its source tensor and three rules (value,
Adam moments, and whether it is new). Deriving those rules in one place keeps every format
equally right: a duplicated layer copies value and (policy ``copy``) moments bit for bit, a
``zero`` layer zeroes its output projections' values *and* moments, a random layer is drawn from
the grown model's initialiser with the plan's per-layer seed and starts with zero moments.

Tensors are addressed format-neutrally by :class:`TensorKey`: ``layer`` is the 0-based transformer
layer (None outside the layers) and ``name`` the layer-relative suffix (or the whole name). Each
writer maps keys to its own names (a pipe writer also shifts every index after the layers by k).

    >>> from lag_ds.growth import parse_operator, plan_growth
    >>> plan = plan_growth(parse_operator("k=1,i0=1,b=1,init=zero"), 2)
    >>> keys = [TensorKey(None, "emb"), TensorKey(0, "attn.out"), TensorKey(1, "attn.out")]
    >>> rs = plan_recipes(keys, plan, is_output_projection=lambda s: s == "attn.out")
    >>> [(r.dst.layer, r.src.layer if r.src else None, r.value, r.moments) for r in rs]
    [(None, None, 'copy', 'copy'), (0, 0, 'copy', 'copy'), (1, 1, 'copy', 'copy'), (2, 1, 'zero', 'zero')]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lag_ds.growth import GrowthPlan

__all__ = [
    "OPTIMIZER_STATE_POLICIES",
    "TensorKey",
    "TensorRecipe",
    "plan_recipes",
    "random_tensor",
]

OPTIMIZER_STATE_POLICIES = ("copy", "zero")


@dataclass(frozen=True, order=True)
class TensorKey:
    layer: int | None
    """0-based transformer layer, or None for tensors outside the layers."""
    name: str
    """Layer-relative suffix for layer tensors, the format's own name otherwise."""


@dataclass(frozen=True)
class TensorRecipe:
    """One tensor of the grown checkpoint."""

    dst: TensorKey
    src: TensorKey | None
    """Tensor whose value (and moments) are copied; for random tensors the template whose shape,
    dtype and TP rule the new tensor takes (``value == "random"``)."""
    is_new: bool
    value: str
    """``copy`` | ``zero`` | ``random``."""
    moments: str
    """``copy`` | ``zero``."""
    seed: int | None = None

    @property
    def copies_everything(self) -> bool:
        return self.value == "copy" and self.moments == "copy"


def plan_recipes(keys: Sequence[TensorKey], plan: GrowthPlan | None, *,
                 is_output_projection: Callable[[str], bool],
                 optimizer_state: str = "copy") -> list[TensorRecipe]:
    """Recipes for the grown model in order: non-layer tensors before the first layer tensor, layers
    ``0..L+k-1`` (each with layer 0's suffixes in their order), then the remaining non-layer tensors.

    ``keys`` are the source's tensors; ``plan=None`` copies everything (a reshard)."""
    if optimizer_state not in OPTIMIZER_STATE_POLICIES:
        raise ValueError(f"--optimizer-state must be one of {OPTIMIZER_STATE_POLICIES}, "
                         f"got {optimizer_state!r}")
    if plan is None:
        return [TensorRecipe(k, k, False, "copy", "copy") for k in keys]
    layers = sorted({k.layer for k in keys if k.layer is not None})
    if layers != list(range(plan.old_num_layers)):
        raise ValueError(f"--op is planned for {plan.old_num_layers} layers but the checkpoint has "
                         f"{len(layers)} (layer indices {layers[:8]})")
    suffixes = [k.name for k in keys if k.layer == 0]
    for layer in layers:
        names = [k.name for k in keys if k.layer == layer]
        if names != suffixes:
            raise ValueError(f"layer {layer} holds tensors {names[:4]}... unlike layer 0 "
                             f"{suffixes[:4]}...: layers must share one structure to grow")
    first = next(i for i, k in enumerate(keys) if k.layer is not None)
    out = [TensorRecipe(k, k, False, "copy", "copy") for k in keys[:first] if k.layer is None]
    for source in plan.layers:
        for suffix in suffixes:
            dst = TensorKey(source.new_index, suffix)
            if not source.is_new:
                out.append(TensorRecipe(dst, TensorKey(source.old_index, suffix), False, "copy", "copy"))
                continue
            zeroed = source.zero_output_projections and is_output_projection(suffix)
            random = source.copy_from is None
            value = "zero" if zeroed else "random" if random else "copy"
            copy_moments = value == "copy" and optimizer_state == "copy"
            out.append(TensorRecipe(dst, TensorKey(source.old_index, suffix), True, value,
                                    "copy" if copy_moments else "zero",
                                    source.seed if random else None))
    out += [TensorRecipe(k, k, False, "copy", "copy") for k in keys[first:] if k.layer is None]
    return out


def random_tensor(suffix: str, shape: tuple[int, ...], *, std: float, num_layers: int, seed: int,
                  output_projection: bool) -> torch.Tensor:
    """Megatron's init for a fresh layer tensor, drawn from ``seed`` (fp32, full TP-merged shape).

    Weights ~ N(0, std); output projections ~ N(0, std / sqrt(2 L)) with the *grown* depth L;
    norm weights 1; biases 0. The suffix is mixed into the seed so one layer's tensors are
    independent draws (the same rule as :func:`megatron_layout.random_layer_param`)."""
    if suffix.endswith("bias"):
        return torch.zeros(shape)
    if "norm" in suffix:
        return torch.ones(shape)
    mixed = (seed * 1_000_003 + sum(map(ord, suffix)) * 7919) % (2**63)
    generator = torch.Generator().manual_seed(mixed)
    sigma = std / math.sqrt(2.0 * num_layers) if output_projection else std
    return torch.randn(shape, generator=generator) * sigma
