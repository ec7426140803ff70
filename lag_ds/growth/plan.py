"""A growth plan: for every layer of the grown model, where it comes from and how it is initialised.

Why: growing is "plan, then execute" (mergekit's planner). The plan is built without touching a
tensor, printed by ``--dry-run``, written into manifests, and it is the *only* thing a checkpoint
format adapter executes: the adapter maps layer indices to its own parameter names and, for each
``LayerSource``, copies ``copy_from`` (if any), re-initialises with ``seed`` (if any) and zeroes the
output projections (if ``zero_output_projections``). It never needs the operator's arithmetic.

Indices are 0-indexed throughout. Random layers are drawn from the *grown* model's own initialiser
(its config says L+k layers) with the recorded per-layer seed, derived from the plan's base seed and
the new layer index by ``derive_layer_seed`` (stable across runs, machines and Python versions).

Example (paper section 2.1, L=6, k=3, i=2 1-indexed, b=1, duplication)::

    >>> from lag_ds.growth.operator import GrowthOperator
    >>> plan = plan_growth(
    ...     GrowthOperator(num_new_layers=3, start=1, block_size=1, init="duplicate"), 6)
    >>> [layer.old_index + 1 for layer in plan.layers]          # the paper writes 1-indexed
    [1, 2, 2, 3, 3, 4, 4, 5, 6]
    >>> [layer.new_index for layer in plan.new_layers()]
    [2, 4, 6]
    >>> plan.old_to_new[5]
    8
    >>> GrowthPlan.from_dict(plan.to_dict()) == plan
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lag_ds.growth.operator import (
    FUNCTION_PRESERVING_INITS,
    RANDOM_INITS,
    GrowthOperator,
    check_init,
)

__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "GrowthPlan",
    "LayerSource",
    "derive_layer_seed",
    "plan_growth",
]

PLAN_FORMAT = "lag_ds.growth_plan"
PLAN_VERSION = 1


def derive_layer_seed(base_seed: int, new_index: int) -> int:
    """Deterministic seed in ``[0, 2**32)`` (valid for torch and numpy) for layer ``new_index``."""
    for name, value in (("seed", base_seed), ("new_index", new_index)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    digest = hashlib.blake2b(f"lag_ds.growth:{base_seed}:{new_index}".encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "big")


@dataclass(frozen=True, kw_only=True)
class LayerSource:
    """Layer ``new_index`` of the grown model: a kept old layer, or a new one and its init rule."""

    new_index: int
    """Position in the grown model (0-indexed)."""
    old_index: int
    """Kept layers: the old layer itself. New layers: the old layer they copy (duplicate/zero) or,
    for random inits, the old layer whose copy's place they occupy."""
    is_new: bool
    """False for the L old layers (only renumbered), True for the k added ones."""
    init: str | None = None
    """None for kept layers, else one of ``INIT_SCHEMES``."""
    seed: int | None = None
    """Initialiser seed for ``random`` / ``zero-random`` new layers, else None."""
    zero_output_projections: bool = False
    """Zero the attention output projection and MLP down (fc2) projection, weights and biases."""

    def __post_init__(self) -> None:
        where = f"layer new_index={self.new_index}"
        if not self.is_new:
            if self.init is not None or self.seed is not None or self.zero_output_projections:
                raise ValueError(f"{where} is a kept old layer but has init/seed/zeroing set")
            return
        check_init(self.init)
        wants_seed = self.init in RANDOM_INITS
        if wants_seed != (self.seed is not None):
            needs = "needs" if wants_seed else "takes no"
            raise ValueError(f"{where}: init={self.init!r} {needs} seed, got seed={self.seed!r}")
        if self.zero_output_projections != (self.init in FUNCTION_PRESERVING_INITS):
            raise ValueError(
                f"{where}: zero_output_projections={self.zero_output_projections} "
                f"contradicts init={self.init!r}"
            )

    @property
    def copy_from(self) -> int | None:
        """Old layer whose parameters are copied into this one; None when drawn from the initialiser.

        What the new layer's optimizer moments start from is the adapter's declared policy."""
        return None if self.init in RANDOM_INITS else self.old_index

    def rule(self) -> str:
        """One-line human description of how this layer is obtained."""
        if not self.is_new:
            return f"old {self.old_index}"
        if self.init in RANDOM_INITS:
            rule = f"NEW random (seed {self.seed}) in the place of a copy of old {self.old_index}"
        else:
            rule = f"NEW copy of old {self.old_index}"
        if self.zero_output_projections:
            rule += ", output projections zeroed"
        return rule


def _layout(op: GrowthOperator, num_layers: int) -> list[tuple[bool, int]]:
    """(is_new, old_index) for each grown-model position, straight from section 2.1."""
    k, i, b = op.num_new_layers, op.start, op.block_size
    out = [(False, old) for old in range(i)]
    for block_start in range(i, i + k, b):
        block = range(block_start, block_start + b)
        out += [(False, old) for old in block] + [(True, old) for old in block]
    out += [(False, old) for old in range(i + k, num_layers)]
    return out


def _closed_form_new_index(op: GrowthOperator, old: int, *, is_new: bool) -> int:
    """Independent arithmetic for where (a copy of) old layer ``old`` lands; checks ``_layout``."""
    i, k, b = op.start, op.num_new_layers, op.block_size
    if old < i:
        return old
    if old >= i + k:
        return old + k
    block, offset = divmod(old - i, b)
    return i + 2 * block * b + offset + (b if is_new else 0)


def _expected_layers(op: GrowthOperator, num_layers: int, seed: int) -> tuple[LayerSource, ...]:
    """The plan's layers for ``op`` on ``num_layers`` layers with base ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    layers = []
    for position, (is_new, old) in enumerate(_layout(op, num_layers)):
        assert _closed_form_new_index(op, old, is_new=is_new) == position, (op.name, old, is_new)
        random = is_new and op.init in RANDOM_INITS
        layers.append(
            LayerSource(
                new_index=position,
                old_index=old,
                is_new=is_new,
                init=op.init if is_new else None,
                seed=derive_layer_seed(seed, position) if random else None,
                zero_output_projections=is_new and op.init in FUNCTION_PRESERVING_INITS,
            )
        )
    return tuple(layers)


@dataclass(frozen=True, kw_only=True)
class GrowthPlan:
    """The grown model layer by layer. Build with ``plan_growth``; invalid plans cannot exist."""

    operator: GrowthOperator
    old_num_layers: int
    new_num_layers: int
    seed: int
    """Base seed the random layers' seeds derive from (recorded so ``from_dict`` can re-check)."""
    layers: tuple[LayerSource, ...]

    def __post_init__(self) -> None:
        op, n = self.operator, self.old_num_layers
        op.validate(n)
        if self.new_num_layers != n + op.num_new_layers:
            raise ValueError(
                f"new_num_layers={self.new_num_layers} must be old_num_layers + k = "
                f"{n + op.num_new_layers}"
            )
        if not isinstance(self.layers, tuple) or len(self.layers) != self.new_num_layers:
            raise ValueError(f"layers must be a tuple of {self.new_num_layers} LayerSource")
        expected_layers = _expected_layers(op, n, self.seed)
        for position, (layer, expected) in enumerate(zip(self.layers, expected_layers)):
            if layer != expected:
                raise ValueError(
                    f"layers[{position}]={layer} disagrees with operator {op.name} on L={n} "
                    f"(expected {expected})"
                )

    @property
    def name(self) -> str:
        return self.operator.name

    @property
    def old_to_new(self) -> Mapping[int, int]:
        """Old layer index -> its (renumbered) index in the grown model; covers all old layers."""
        return {layer.old_index: layer.new_index for layer in self.layers if not layer.is_new}

    def new_layers(self) -> tuple[LayerSource, ...]:
        """The k added layers, in grown-model order."""
        return tuple(layer for layer in self.layers if layer.is_new)

    def kept_layers(self) -> tuple[LayerSource, ...]:
        """The L old layers, in order, with their new positions."""
        return tuple(layer for layer in self.layers if not layer.is_new)

    def describe(self) -> str:
        """Human-readable table for ``--dry-run``: grown layer j <- old layer / init rule."""
        op = self.operator
        lines = [
            f"growth plan {op.name}: {self.old_num_layers} -> {self.new_num_layers} layers "
            f"(k={op.num_new_layers}, start i={op.start} 0-indexed / {op.start + 1} 1-indexed, "
            f"block b={op.block_size}, init={op.init}, seed={self.seed}; indices 0-based)",
            f"{'new':>5}  {'':1}  source",
        ]
        for layer in self.layers:
            mark = "*" if layer.is_new else " "
            lines.append(f"{layer.new_index:>5}  {mark}  {layer.rule()}")
        lines.append(f"* = new layer ({op.num_new_layers} of {self.new_num_layers})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for manifests; ``from_dict`` re-validates it against the operator."""
        op = self.operator
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "operator": {
                "name": op.name,
                "num_new_layers": op.num_new_layers,
                "start": op.start,
                "block_size": op.block_size,
                "init": op.init,
            },
            "old_num_layers": self.old_num_layers,
            "new_num_layers": self.new_num_layers,
            "seed": self.seed,
            "layers": [
                {
                    "new_index": layer.new_index,
                    "old_index": layer.old_index,
                    "is_new": layer.is_new,
                    "init": layer.init,
                    "seed": layer.seed,
                    "zero_output_projections": layer.zero_output_projections,
                }
                for layer in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GrowthPlan:
        """Inverse of ``to_dict``; ``ValueError`` names the first bad or inconsistent entry."""
        if not isinstance(data, Mapping):
            raise ValueError(f"plan must be a mapping, got {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT or data.get("version") != PLAN_VERSION:
            raise ValueError(
                f"plan format={data.get('format')!r} version={data.get('version')!r}: "
                f"expected {PLAN_FORMAT!r} version {PLAN_VERSION}"
            )
        try:
            raw_op = data["operator"]
            fields = ("num_new_layers", "start", "block_size", "init")
            op = GrowthOperator(**{key: raw_op[key] for key in fields})
            if "name" in raw_op and raw_op["name"] != op.name:
                raise ValueError(
                    f"operator name={raw_op['name']!r} disagrees with its fields ({op.name})"
                )
            layers = tuple(LayerSource(**dict(layer)) for layer in data["layers"])
            return cls(
                operator=op,
                old_num_layers=data["old_num_layers"],
                new_num_layers=data["new_num_layers"],
                seed=data["seed"],
                layers=layers,
            )
        except KeyError as missing:
            raise ValueError(f"plan is missing key {missing}") from None
        except TypeError as bad:
            raise ValueError(f"plan has a malformed entry: {bad}") from None


def plan_growth(op: GrowthOperator, num_layers: int, *, seed: int = 0) -> GrowthPlan:
    """Plan growing a ``num_layers``-layer model with ``op``; ``seed`` seeds its random layers."""
    op.validate(num_layers)
    plan = GrowthPlan(
        operator=op,
        old_num_layers=num_layers,
        new_num_layers=num_layers + op.num_new_layers,
        seed=seed,
        layers=_expected_layers(op, num_layers, seed),
    )
    kept = [layer.old_index for layer in plan.kept_layers()]
    assert kept == list(range(num_layers)), (op.name, kept)
    assert len(plan.new_layers()) == op.num_new_layers, op.name
    return plan
