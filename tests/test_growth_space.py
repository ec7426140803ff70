"""Design spaces: the paper's 30 operators, baselines, appendix A.3 stages, space strings."""

from __future__ import annotations

import pytest

from lag_ds.growth import (
    GrowthOperator,
    enumerate_design_space,
    gradual_stacking_operator,
    paper_bert_space,
    paper_ul2_space,
    parse_space,
    plan_growth,
    stack_last_block_on_top,
    stack_random_block_on_top,
)


def test_paper_space_has_the_30_operators_of_section_3_1() -> None:
    ops = paper_ul2_space()
    assert len(ops) == len(set(ops)) == 30
    assert {op.start for op in ops} == {0, 2, 4, 6, 8}
    assert {op.block_size for op in ops} == {1, 2, 4}
    assert {op.init for op in ops} == {"random", "duplicate"}
    assert {op.num_new_layers for op in ops} == {4}
    for op in ops:
        op.validate(12)
    assert len({op.name for op in ops}) == 30
    assert paper_bert_space() == ops


def test_enumeration_order_is_deterministic_and_argument_order_free() -> None:
    ops = enumerate_design_space(
        12, 4, starts=[8, 0, 4], block_sizes=[4, 1], inits=["random", "duplicate"]
    )
    again = enumerate_design_space(
        12, 4, starts=[0, 4, 8], block_sizes=[1, 4], inits=["duplicate", "random"]
    )
    assert ops == again
    keys = [(op.start, op.block_size, op.init) for op in ops]
    init_rank = {"duplicate": 0, "random": 1}
    assert keys == sorted(keys, key=lambda key: (key[0], key[1], init_rank[key[2]]))
    assert ops[0].name == "k4-i0-b1-duplicate" and ops[-1].name == "k4-i8-b4-random"


def test_default_space_is_every_start_and_divisor() -> None:
    for num_layers in range(1, 9):
        for k in range(1, num_layers + 1):
            ops = enumerate_design_space(num_layers, k)
            num_divisors = sum(k % b == 0 for b in range(1, k + 1))
            assert len(ops) == len(set(ops)) == (num_layers - k + 1) * num_divisors * 2


@pytest.mark.parametrize(
    ("target_layers", "starts"),
    [(8, [0]), (12, [0, 1, 2, 3, 4]), (16, list(range(9)))],
)
def test_appendix_a3_stage_spaces_are_all_valid_starts(
    target_layers: int, starts: list[int]
) -> None:
    # "Stage n (X layers)" grows X-4 -> X layers by duplication, k=4, b in {1, 2, 4}.
    ops = enumerate_design_space(target_layers - 4, 4, inits=("duplicate",))
    assert sorted({op.start for op in ops}) == starts
    assert len(ops) == 3 * len(starts)


def test_appendix_a3_even_start_stages_are_valid() -> None:
    assert len(enumerate_design_space(16, 4, starts=range(0, 13, 2), inits=("duplicate",))) == 21
    assert len(enumerate_design_space(20, 4, starts=range(0, 17, 2), inits=("duplicate",))) == 27


def test_baselines_are_what_the_paper_says() -> None:
    last = stack_last_block_on_top(12, 4)
    rand = stack_random_block_on_top(12, 4)
    assert last == GrowthOperator(num_new_layers=4, start=8, block_size=4, init="duplicate")
    assert rand == GrowthOperator(num_new_layers=4, start=8, block_size=4, init="random")
    assert last in paper_ul2_space() and rand in paper_ul2_space()
    plan = plan_growth(last, 12)
    assert [layer.old_index for layer in plan.layers] == list(range(12)) + [8, 9, 10, 11]
    assert [layer.new_index for layer in plan.new_layers()] == [12, 13, 14, 15]
    assert all(layer.seed is not None for layer in plan_growth(rand, 12).layers[12:])


def test_gradual_stacking_is_post_stacking_with_start_L_minus_b() -> None:
    # Section 2.2: start L-b+1 1-indexed == L-b 0-indexed; appendix A.3 last stacking, b=4.
    for num_layers in range(4, 21, 4):
        op = gradual_stacking_operator(num_layers, 4)
        assert (op.start, op.block_size, op.num_new_layers) == (num_layers - 4, 4, 4)
        assert op == stack_last_block_on_top(num_layers, 4)
        plan = plan_growth(op, num_layers)
        copied = [layer.copy_from for layer in plan.layers[-4:]]
        assert copied == list(range(num_layers - 4, num_layers))
    assert gradual_stacking_operator(6, 2, init="random").init == "random"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: stack_last_block_on_top(3, 4), "num_new_layers k=4 exceeds num_layers L=3"),
        (lambda: stack_random_block_on_top(4, 0), "num_new_layers k=0"),
        (lambda: gradual_stacking_operator(2, 3), "k=3 exceeds num_layers L=2"),
        (lambda: gradual_stacking_operator(8, 4, init="copy"), "init='copy'"),
        (lambda: enumerate_design_space(12, 4, starts=[0, 9]), "start index i=9"),
        (lambda: enumerate_design_space(12, 4, block_sizes=[3]), "block size b=3"),
        (lambda: enumerate_design_space(12, 4, inits=["copy"]), "init='copy'"),
        (lambda: enumerate_design_space(3, 4), "num_new_layers k=4"),
        (lambda: enumerate_design_space(12, 4, starts=[0, 0]), "starts lists 0 twice"),
        (lambda: enumerate_design_space(12, 4, block_sizes=[]), "block_sizes is empty"),
    ],
)
def test_space_errors_name_the_argument(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_parse_space_strings() -> None:
    paper = paper_ul2_space()
    assert parse_space("paper", num_layers=12, num_new_layers=4) == paper
    text = "starts=0,2,4,6,8;blocks=1,2,4;inits=duplicate,random"
    assert parse_space(text, num_layers=12, num_new_layers=4, index_base=0) == paper
    one = "starts=1,3,5,7,9;blocks=1,2,4;inits=duplicate,random"
    assert parse_space(one, num_layers=12, num_new_layers=4, index_base=1) == paper
    spaced = " starts1=1,3,5,7,9 ; blocks=1, 2, 4"
    assert parse_space(spaced, num_layers=12, num_new_layers=4) == paper
    assert parse_space("all", num_layers=12, num_new_layers=4) == enumerate_design_space(12, 4)
    assert parse_space("inits=zero", num_layers=6, num_new_layers=2) == enumerate_design_space(
        6, 2, inits=("zero",)
    )
    assert len(parse_space("starts0=0;blocks=2", num_layers=6, num_new_layers=2)) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("starts=0,2", "bare 'starts='"),
        ("starts0=0,9", "start index i=9"),
        ("starts1=0", "starts1: start 0 is below 1"),
        ("starts0=0;starts1=2", "'starts1' repeats a starts key"),
        ("blocks=1,3", "block size b=3"),
        ("blocks=one", "blocks: 'one' is not an integer"),
        ("inits=duplicate,copy", "init='copy'"),
        ("depth=3", "unknown space key 'depth'"),
        ("starts0", "space part 'starts0'"),
        ("", "empty"),
    ],
)
def test_parse_space_errors_name_the_bad_part(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_space(text, num_layers=12, num_new_layers=4)


def test_paper_space_string_checks_the_depth() -> None:
    with pytest.raises(ValueError, match="start index i=8"):
        parse_space("paper", num_layers=11, num_new_layers=4)
