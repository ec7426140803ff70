"""One depth-growth operator: which k layers are grown, in which blocks, initialised how.

Why: the LAG paper (section 2.1) grows an L-layer network to L+k layers by picking k consecutive
layers starting at index ``i``, cutting them into k/b blocks of ``b`` layers, and inserting a new
copy right after each block. Every candidate LAG@k compares is one such operator, so this tiny
frozen value is the unit the design space, the plans, the manifests and the launcher all share.

Index convention (read this once):

* ``GrowthOperator.start`` is **0-indexed**, like Python, section 3.1 and appendix A of the paper
  (12 -> 16 layers with k=4: valid starts 0..8, the paper uses 0, 2, 4, 6, 8).
* Section 2.1 of the paper writes ``i`` **1-indexed** (L=6, k=3: feasible i in 1..4). Its example
  "i=2, b=1, duplication" is ``GrowthOperator(num_new_layers=3, start=1, block_size=1, ...)``.
* ``parse_operator`` therefore never guesses: ``i0=`` is 0-indexed, ``i1=`` is 1-indexed, and a bare
  ``i=`` needs ``index_base=0`` or ``index_base=1``. The canonical ``name`` (``k4-i4-b2-duplicate``)
  is always 0-indexed.

Initialisation schemes (``INIT_SCHEMES``):

* ``duplicate``   -- the new layer is a copy of the corresponding old layer of its block.
* ``random``      -- the model's own initialiser, with a seed per new layer (recorded by the plan).
* ``zero``        -- LLaMA-Pro style, function preserving: a copy whose output projections
  (attention output projection and MLP down/fc2 projection, weights and biases) are zero, so the
  new block is an identity residual block at step 0.
* ``zero-random`` -- the same zeroed output projections on top of a random layer; also function
  preserving, but the new layer's other weights do not mirror an old layer.

Example::

    >>> op = parse_operator("k=3,i=2,b=1,init=duplicate", index_base=1)   # paper section 2.1
    >>> op.name
    'k3-i1-b1-duplicate'
    >>> op.validate(6)
    >>> parse_operator(op.name) == op
    True
    >>> GrowthOperator(num_new_layers=4, start=9, block_size=4, init="random").validate(12)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: start index i=9 out of range: with L=12, k=4 the valid 0-indexed starts are 0..8 ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "FUNCTION_PRESERVING_INITS",
    "INIT_SCHEMES",
    "RANDOM_INITS",
    "GrowthOperator",
    "check_init",
    "divisors",
    "parse_operator",
]

INIT_SCHEMES: tuple[str, ...] = ("duplicate", "random", "zero", "zero-random")
"""Every initialisation scheme, in canonical order (design spaces are listed in this order)."""

RANDOM_INITS: frozenset[str] = frozenset({"random", "zero-random"})
"""Schemes whose new layers are drawn from the initialiser and therefore carry a seed."""

FUNCTION_PRESERVING_INITS: frozenset[str] = frozenset({"zero", "zero-random"})
"""Schemes that zero the new layers' output projections, leaving the logits unchanged at step 0."""

_NAME_RE = re.compile(r"k(?P<k>\d+)-i(?P<i>\d+)-b(?P<b>\d+)-(?P<init>[a-z][a-z-]*)")


def _check_int(value: object, *, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def check_init(init: object) -> str:
    """Return ``init`` if it names a scheme in ``INIT_SCHEMES``, else raise ``ValueError``."""
    if init not in INIT_SCHEMES:
        raise ValueError(f"unknown init={init!r}: expected one of {', '.join(INIT_SCHEMES)}")
    return init  # type: ignore[return-value]


def divisors(n: int) -> tuple[int, ...]:
    """All block sizes valid for ``n`` new layers, ascending (``divisors(4) == (1, 2, 4)``)."""
    _check_int(n, name="num_new_layers k", minimum=1)
    return tuple(d for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True, kw_only=True)
class GrowthOperator:
    """Grow ``num_new_layers`` layers at 0-indexed ``start`` in blocks of ``block_size``."""

    num_new_layers: int
    """k: how many layers are added (and how many consecutive old layers are grown)."""
    start: int
    """i, 0-indexed: the first of the k consecutive old layers that are grown."""
    block_size: int
    """b: the k layers are cut into k/b blocks; each block is followed by its copy. Divides k."""
    init: str
    """How the new layers are initialised: one of ``INIT_SCHEMES``."""

    def __post_init__(self) -> None:
        k = _check_int(self.num_new_layers, name="num_new_layers k", minimum=1)
        _check_int(self.start, name="start index i", minimum=0)
        b = _check_int(self.block_size, name="block size b", minimum=1)
        if k % b:
            raise ValueError(
                f"block size b={b} does not divide k={k}: valid block sizes are "
                f"{', '.join(map(str, divisors(k)))}"
            )
        check_init(self.init)

    def validate(self, num_layers: int) -> None:
        """Raise ``ValueError`` unless this operator can grow a ``num_layers``-layer model."""
        n = _check_int(num_layers, name="num_layers L", minimum=1)
        k = self.num_new_layers
        if k > n:
            raise ValueError(f"num_new_layers k={k} exceeds num_layers L={n}: k must be 1..{n}")
        last = n - k
        if self.start > last:
            raise ValueError(
                f"start index i={self.start} out of range: with L={n}, k={k} the valid "
                f"0-indexed starts are 0..{last} (1-indexed 1..{last + 1})"
            )

    @property
    def name(self) -> str:
        """Stable, filesystem-safe id with a 0-indexed start, e.g. ``k4-i4-b2-duplicate``."""
        return f"k{self.num_new_layers}-i{self.start}-b{self.block_size}-{self.init}"

    @property
    def function_preserving(self) -> bool:
        """True when the grown model computes the same function as the old one at step 0."""
        return self.init in FUNCTION_PRESERVING_INITS

    @property
    def num_blocks(self) -> int:
        """k / b: how many (old block, new block) pairs the grown region holds."""
        return self.num_new_layers // self.block_size

    def __str__(self) -> str:
        return self.name


def _parse_int(key: str, value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(f"{key}={value!r} is not an integer") from None


def parse_operator(
    text: str, *, index_base: int | None = None, num_layers: int | None = None
) -> GrowthOperator:
    """Parse ``"k=4,i=4,b=2,init=duplicate"`` or the name form ``"k4-i4-b2-duplicate"``.

    Keys: ``k``, ``b``, ``init`` and exactly one of ``i0`` (0-indexed start), ``i1`` (1-indexed
    start) or ``i`` (interpreted with ``index_base``, which must then be 0 or 1). The name form is
    always 0-indexed. With ``num_layers`` the operator is also validated against that depth.
    """
    if index_base not in (None, 0, 1):
        raise ValueError(f"index_base={index_base!r} must be 0 or 1")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"operator text={text!r} is empty")
    text = text.strip()
    match = _NAME_RE.fullmatch(text)
    if match is not None:
        op = GrowthOperator(
            num_new_layers=int(match["k"]),
            start=int(match["i"]),
            block_size=int(match["b"]),
            init=check_init(match["init"]),
        )
    else:
        op = _parse_key_values(text, index_base=index_base)
    if num_layers is not None:
        try:
            op.validate(num_layers)
        except ValueError as error:  # say which text it was: the start may have been 1-indexed
            raise ValueError(f"{error} [parsed from {text!r}]") from None
    return op


def _parse_key_values(text: str, *, index_base: int | None) -> GrowthOperator:
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise ValueError(
                f"operator part {part.strip()!r} in {text!r} is not key=value "
                "(expected e.g. 'k=4,i0=4,b=2,init=duplicate' or 'k4-i4-b2-duplicate')"
            )
        if key not in ("k", "i", "i0", "i1", "b", "init"):
            raise ValueError(f"unknown operator key {key!r} in {text!r}: use k, i0, i1, i, b, init")
        if key in fields:
            raise ValueError(f"operator key {key!r} given twice in {text!r}")
        fields[key] = value.strip()
    start_keys = [key for key in ("i", "i0", "i1") if key in fields]
    if len(start_keys) != 1:
        raise ValueError(f"operator {text!r} needs exactly one start key of i0, i1, i")
    missing = [key for key in ("k", "b", "init") if key not in fields]
    if missing:
        raise ValueError(f"operator {text!r} is missing key {missing[0]!r}")
    (start_key,) = start_keys
    if start_key == "i":
        if index_base is None:
            raise ValueError(
                f"operator {text!r} uses a bare 'i=': pass index_base=0 or 1, or write i0=/i1="
            )
        base = index_base
    else:
        base = int(start_key[1])
    raw_start = _parse_int(start_key, fields[start_key])
    if raw_start < base:
        raise ValueError(f"start index {start_key}={raw_start} is below {base} ({base}-indexed)")
    return GrowthOperator(
        num_new_layers=_parse_int("k", fields["k"]),
        start=raw_start - base,
        block_size=_parse_int("b", fields["b"]),
        init=check_init(fields["init"]),
    )
