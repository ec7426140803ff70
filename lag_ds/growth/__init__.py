"""Pure depth-growth operators, plans and design spaces (LAG paper, section 2.1).

No tensors, no files, no torch.distributed: only frozen dataclasses that say which layer of the
grown model comes from which old layer and how it is initialised. Indices are 0-indexed (the paper's
section 2 is 1-indexed; see ``lag_ds.growth.operator``). Checkpoint adapters execute plans.

    >>> from lag_ds.growth import paper_ul2_space, plan_growth
    >>> plans = [plan_growth(op, 12, seed=0) for op in paper_ul2_space()]
    >>> len(plans), plans[0].new_num_layers
    (30, 16)
"""

from lag_ds.growth.operator import (
    FUNCTION_PRESERVING_INITS,
    INIT_SCHEMES,
    RANDOM_INITS,
    GrowthOperator,
    check_init,
    divisors,
    parse_operator,
)
from lag_ds.growth.plan import (
    PLAN_FORMAT,
    PLAN_VERSION,
    GrowthPlan,
    LayerSource,
    derive_layer_seed,
    plan_growth,
)
from lag_ds.growth.space import (
    DEFAULT_INITS,
    PAPER_BLOCK_SIZES,
    PAPER_INITS,
    PAPER_STARTS,
    enumerate_design_space,
    gradual_stacking_operator,
    paper_bert_space,
    paper_ul2_space,
    parse_space,
    stack_last_block_on_top,
    stack_random_block_on_top,
)

__all__ = [
    "DEFAULT_INITS",
    "FUNCTION_PRESERVING_INITS",
    "INIT_SCHEMES",
    "PAPER_BLOCK_SIZES",
    "PAPER_INITS",
    "PAPER_STARTS",
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "RANDOM_INITS",
    "GrowthOperator",
    "GrowthPlan",
    "LayerSource",
    "check_init",
    "derive_layer_seed",
    "divisors",
    "enumerate_design_space",
    "gradual_stacking_operator",
    "paper_bert_space",
    "paper_ul2_space",
    "parse_operator",
    "parse_space",
    "plan_growth",
    "stack_last_block_on_top",
    "stack_random_block_on_top",
]
