"""Design spaces of growth operators, the paper's 30-operator space, and its baselines.

Why: LAG@k trains every operator of a design space for k steps and keeps the best, so the space must
be enumerated in one deterministic order (candidate ids, journals and reports depend on it), be
writable as a short CLI/env string, and contain the paper's named baselines.

* ``paper_ul2_space()`` / ``paper_bert_space()``: 12 -> 16 layers (k=4), starts {0, 2, 4, 6, 8}
  (0-indexed, section 3.1), block sizes {1, 2, 4}, inits {random, duplicate}: 30 operators.
* ``stack_last_block_on_top(L, k)``: "Stack last block on top" in tables 1-3: duplicate the final k
  layers after themselves (start L-k, b=k). ``stack_random_block_on_top(L, k)``: the same with
  random init.
* ``gradual_stacking_operator(L, b)``: Reddi et al.'s post-stacking, one stage. Section 2.2 writes
  the start as L-b+1 (1-indexed), i.e. ``start = L - b`` here (0-indexed), block size b, k = b.

Space strings (``parse_space``): ``"paper"``, ``"all"``, or ``;``-separated ``key=v1,v2`` parts
with keys ``starts`` (index base from ``index_base``), ``starts0`` (0-indexed), ``starts1``
(1-indexed), ``blocks`` and ``inits``. Omitted keys mean every valid start, every divisor of k and
the inits ``duplicate,random``.

Example::

    >>> ops = parse_space("starts0=0,2,4,6,8;blocks=1,2,4;inits=duplicate,random",
    ...                   num_layers=12, num_new_layers=4)
    >>> len(ops), ops[0].name, ops[-1].name
    (30, 'k4-i0-b1-duplicate', 'k4-i8-b4-random')
    >>> set(ops) == set(paper_ul2_space())
    True
    >>> stack_last_block_on_top(12, 4).name
    'k4-i8-b4-duplicate'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lag_ds.growth.operator import INIT_SCHEMES, GrowthOperator, check_init, divisors

__all__ = [
    "DEFAULT_INITS",
    "PAPER_BLOCK_SIZES",
    "PAPER_INITS",
    "PAPER_STARTS",
    "enumerate_design_space",
    "gradual_stacking_operator",
    "paper_bert_space",
    "paper_ul2_space",
    "parse_space",
    "stack_last_block_on_top",
    "stack_random_block_on_top",
]

DEFAULT_INITS: tuple[str, ...] = ("duplicate", "random")
PAPER_NUM_LAYERS = 12
PAPER_NUM_NEW_LAYERS = 4
PAPER_STARTS: tuple[int, ...] = (0, 2, 4, 6, 8)
PAPER_BLOCK_SIZES: tuple[int, ...] = (1, 2, 4)
PAPER_INITS: tuple[str, ...] = ("random", "duplicate")


def _distinct(name: str, values: Iterable[object]) -> list:
    values = list(values)
    if not values:
        raise ValueError(f"{name} is empty")
    seen: set[object] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{name} lists {value!r} twice")
        seen.add(value)
    return values


def enumerate_design_space(
    num_layers: int,
    num_new_layers: int,
    *,
    starts: Sequence[int] | None = None,
    block_sizes: Sequence[int] | None = None,
    inits: Sequence[str] = DEFAULT_INITS,
) -> list[GrowthOperator]:
    """Every operator in starts x block_sizes x inits, validated for ``num_layers``.

    ``starts`` are 0-indexed (None: all of ``0..L-k``), ``block_sizes`` must divide k (None: all
    divisors). Order is deterministic and independent of the argument order: start ascending, then
    block size ascending, then init in ``INIT_SCHEMES`` order.
    """
    _check_depth(num_layers, num_new_layers)
    if starts is None:
        starts = range(num_layers - num_new_layers + 1)
    if block_sizes is None:
        block_sizes = divisors(num_new_layers)
    starts = sorted(_distinct("starts", starts))
    block_sizes = sorted(_distinct("block_sizes", block_sizes))
    inits = [check_init(init) for init in _distinct("inits", inits)]
    inits.sort(key=INIT_SCHEMES.index)
    ops = []
    for start in starts:
        for block_size in block_sizes:
            for init in inits:
                op = GrowthOperator(
                    num_new_layers=num_new_layers, start=start, block_size=block_size, init=init
                )
                op.validate(num_layers)
                ops.append(op)
    return ops


def paper_ul2_space() -> list[GrowthOperator]:
    """The 30 operators of section 4.1 (UL2, 12 -> 16 layers): same as ``paper_bert_space``."""
    return enumerate_design_space(
        PAPER_NUM_LAYERS,
        PAPER_NUM_NEW_LAYERS,
        starts=PAPER_STARTS,
        block_sizes=PAPER_BLOCK_SIZES,
        inits=PAPER_INITS,
    )


def paper_bert_space() -> list[GrowthOperator]:
    """The 30 operators of section 3.1 (BERT-Base, 12 -> 16 layers)."""
    return paper_ul2_space()


def _check_depth(num_layers: int, num_new_layers: int) -> None:
    """Raise the operator's own ``ValueError`` unless k new layers can be grown on L layers."""
    GrowthOperator(num_new_layers=num_new_layers, start=0, block_size=1, init="duplicate").validate(
        num_layers
    )


def _on_top(num_layers: int, num_new_layers: int, init: str) -> GrowthOperator:
    _check_depth(num_layers, num_new_layers)
    op = GrowthOperator(
        num_new_layers=num_new_layers,
        start=num_layers - num_new_layers,
        block_size=num_new_layers,
        init=init,
    )
    op.validate(num_layers)
    return op


def stack_last_block_on_top(num_layers: int, num_new_layers: int) -> GrowthOperator:
    """Baseline "Stack last block on top": duplicate the final k layers after themselves."""
    return _on_top(num_layers, num_new_layers, "duplicate")


def stack_random_block_on_top(num_layers: int, num_new_layers: int) -> GrowthOperator:
    """Baseline "Stack random block on top": k randomly initialised layers after the last one."""
    return _on_top(num_layers, num_new_layers, "random")


def gradual_stacking_operator(
    num_layers: int, block_size: int, *, init: str = "duplicate"
) -> GrowthOperator:
    """One stage of Reddi et al.'s gradual post-stacking (section 2.2): grow L to L+b.

    The paper's start index L-b+1 is 1-indexed; here ``start = L - b`` (0-indexed), k = b. This is
    ``stack_last_block_on_top(L, b)`` when ``init`` is duplicate (appendix A.3 "last stacking").
    """
    return _on_top(num_layers, block_size, check_init(init))


def _parse_ints(key: str, raw: str) -> list[int]:
    out = []
    for item in raw.split(","):
        try:
            out.append(int(item.strip()))
        except ValueError:
            raise ValueError(f"{key}: {item.strip()!r} is not an integer") from None
    return out


def parse_space(
    text: str, *, num_layers: int, num_new_layers: int, index_base: int | None = None
) -> list[GrowthOperator]:
    """Parse a space string (see the module docstring) into ``enumerate_design_space``'s list.

    ``"paper"`` is the paper's 30-operator space (starts 0,2,4,6,8; blocks 1,2,4; random and
    duplicate), checked against ``num_layers``/``num_new_layers``; ``"all"`` every valid operator
    with inits duplicate and random. A bare ``starts=`` needs ``index_base`` 0 or 1.
    """
    if index_base not in (None, 0, 1):
        raise ValueError(f"index_base={index_base!r} must be 0 or 1")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"space text={text!r} is empty")
    text = text.strip()
    if text == "paper":
        return enumerate_design_space(
            num_layers,
            num_new_layers,
            starts=PAPER_STARTS,
            block_sizes=PAPER_BLOCK_SIZES,
            inits=PAPER_INITS,
        )
    if text == "all":
        return enumerate_design_space(num_layers, num_new_layers)
    starts: list[int] | None = None
    block_sizes: list[int] | None = None
    inits: list[str] = list(DEFAULT_INITS)
    seen: set[str] = set()
    for part in text.split(";"):
        key, sep, raw = part.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise ValueError(
                f"space part {part.strip()!r} in {text!r} is not key=v1,v2 "
                "(keys: starts, starts0, starts1, blocks, inits; or 'paper' / 'all')"
            )
        family = "starts" if key.startswith("starts") else key
        if family in seen:
            raise ValueError(f"space key {key!r} repeats a {family} key in {text!r}")
        seen.add(family)
        if key in ("starts", "starts0", "starts1"):
            base = index_base if key == "starts" else int(key[-1])
            if base is None:
                raise ValueError(
                    f"space {text!r} uses a bare 'starts=': pass index_base=0 or 1, "
                    "or write starts0=/starts1="
                )
            values = _parse_ints(key, raw)
            for value in values:
                if value < base:
                    raise ValueError(f"{key}: start {value} is below {base} ({base}-indexed)")
            starts = [value - base for value in values]
        elif key == "blocks":
            block_sizes = _parse_ints(key, raw)
        elif key == "inits":
            inits = [item.strip() for item in raw.split(",")]
        else:
            raise ValueError(
                f"unknown space key {key!r} in {text!r}: "
                "use starts, starts0, starts1, blocks, inits"
            )
    return enumerate_design_space(
        num_layers, num_new_layers, starts=starts, block_sizes=block_sizes, inits=inits
    )
