"""GrowthOperator validation, names and the index-base-explicit parser."""

from __future__ import annotations

import pytest

from lag_ds.growth import INIT_SCHEMES, GrowthOperator, divisors, parse_operator


def op(k: int, i: int, b: int, init: str = "duplicate") -> GrowthOperator:
    return GrowthOperator(num_new_layers=k, start=i, block_size=b, init=init)


def test_out_of_range_start_names_i_and_the_valid_range() -> None:
    with pytest.raises(ValueError, match=r"start index i=9 out of range: with L=12, k=4 .* 0\.\.8"):
        op(4, 9, 4).validate(12)
    op(4, 8, 4).validate(12)  # the last valid start


def test_block_size_not_dividing_k_names_b() -> None:
    with pytest.raises(ValueError, match=r"block size b=3 does not divide k=4.*1, 2, 4"):
        op(4, 0, 3)


def test_k_larger_than_L_names_k() -> None:
    with pytest.raises(ValueError, match=r"num_new_layers k=5 exceeds num_layers L=4"):
        op(5, 0, 1).validate(4)
    op(4, 0, 1).validate(4)


def test_unknown_init_names_init() -> None:
    with pytest.raises(ValueError, match=r"init='copy'"):
        op(4, 0, 1, "copy")


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(num_new_layers=0, start=0, block_size=1), "num_new_layers k"),
        (dict(num_new_layers=2, start=-1, block_size=1), "start index i"),
        (dict(num_new_layers=2, start=0, block_size=0), "block size b"),
        (dict(num_new_layers=2, start=True, block_size=1), "start index i"),
        (dict(num_new_layers=2.0, start=0, block_size=1), "num_new_layers k"),
    ],
)
def test_bad_integers_name_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        GrowthOperator(init="random", **kwargs)


def test_validate_rejects_bad_num_layers() -> None:
    with pytest.raises(ValueError, match="num_layers L"):
        op(1, 0, 1).validate(0)


def test_divisors() -> None:
    assert divisors(4) == (1, 2, 4)
    assert divisors(12) == (1, 2, 3, 4, 6, 12)
    assert divisors(1) == (1,)


def test_name_is_zero_indexed_filesystem_safe_and_round_trips() -> None:
    assert op(4, 4, 2).name == "k4-i4-b2-duplicate"
    for k in range(1, 7):
        for b in divisors(k):
            for init in INIT_SCHEMES:
                operator = op(k, 3, b, init)
                assert parse_operator(operator.name) == operator
                assert all(c.isalnum() or c == "-" for c in operator.name)


def test_zero_and_one_indexed_parse_to_the_same_operator() -> None:
    zero = parse_operator("k=4,i0=4,b=2,init=duplicate")
    one = parse_operator("k=4,i1=5,b=2,init=duplicate")
    assert zero == one == op(4, 4, 2)
    assert parse_operator("k=4,i=4,b=2,init=duplicate", index_base=0) == zero
    assert parse_operator("k=4,i=5,b=2,init=duplicate", index_base=1) == zero
    # explicit keys win over index_base, and whitespace is tolerated
    assert parse_operator(" k = 4, i0 = 4 , b=2, init=duplicate ", index_base=1) == zero


def test_paper_section_2_example_parses_one_indexed() -> None:
    parsed = parse_operator("k=3,i=2,b=3,init=random", index_base=1, num_layers=6)
    assert parsed == op(3, 1, 3, "random")
    assert parsed.name == "k3-i1-b3-random"


def test_bare_i_without_index_base_is_refused() -> None:
    with pytest.raises(ValueError, match="bare 'i='"):
        parse_operator("k=4,i=4,b=2,init=duplicate")


def test_name_form_is_always_zero_indexed_whatever_index_base() -> None:
    assert parse_operator("k4-i4-b2-zero", index_base=1).start == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("k=4,i0=4,b=2", "missing key 'init'"),
        ("k=4,b=2,init=zero", "exactly one start key"),
        ("k=4,i0=4,i1=5,b=2,init=zero", "exactly one start key"),
        ("k=4,i0=4,b=2,init=zero,depth=3", "unknown operator key 'depth'"),
        ("k=4,k=4,i0=4,b=2,init=zero", "key 'k' given twice"),
        ("k=four,i0=4,b=2,init=zero", "k='four' is not an integer"),
        ("k=4,i1=0,b=2,init=zero", "i1=0 is below 1"),
        ("k=4,i0=4,b=3,init=zero", "block size b=3"),
        ("k=4,i0=4,b=2,init=copy", "init='copy'"),
        ("k4-i4-b2", "not key=value"),
        ("k4-i4-b2-copy", "init='copy'"),
        ("", "empty"),
    ],
)
def test_parse_errors_name_the_bad_part(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_operator(text, index_base=0)


def test_parse_with_num_layers_validates_and_quotes_the_text() -> None:
    with pytest.raises(ValueError, match=r"start index i=9 .*parsed from 'k=4,i1=10"):
        parse_operator("k=4,i1=10,b=4,init=random", num_layers=12)
    with pytest.raises(ValueError, match="index_base=2"):
        parse_operator("k=4,i=1,b=4,init=random", index_base=2)


def test_function_preserving_flag() -> None:
    assert {init for init in INIT_SCHEMES if op(2, 0, 1, init).function_preserving} == {
        "zero",
        "zero-random",
    }
