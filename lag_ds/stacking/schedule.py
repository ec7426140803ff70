"""Stage schedules of gradual stacking (paper section 4.2, appendix A.3), as typed YAML.

A schedule trains one model in stages.  Stage 1 trains ``initial_layers`` layers from scratch;
every later stage grows the model by ``num_new_layers`` with an operator chosen by a race over a
design space (adaptive stacking, LAG per stage), or with a fixed operator (``fixed: last`` is
Reddi et al.'s "last stacking": duplicate the final b layers on top), then trains it for the
rest of the stage.  ``steps`` is the length of each stage; stage s ends at the sum of the steps of
stages 1..s, and a race's k steps count towards the stage (the winner keeps them).

Example (``launch_scripts/configs/stacking/small_cpu.yaml``)::

    train_config: launch_scripts/configs/small_base.yaml
    initial_layers: 2
    eval_interval: 10
    stages:
      - {steps: 120}                                         # stage 1: 2 layers from scratch
      - {steps: 80, num_new_layers: 2, space: "starts0=0;blocks=1,2;inits=duplicate,random", k: 20}
      - {steps: 80, num_new_layers: 2, space: "starts0=0,2;blocks=1,2;inits=duplicate", k: 20}

Everything here is pure (no I/O but reading the YAML): :func:`plan_schedule` turns a schedule
into per-stage layer counts, step ranges, operators and costs, which ``--dry-run`` prints and
the driver executes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lag_ds.config import load_yaml
from lag_ds.growth import GrowthOperator, parse_operator, parse_space, stack_last_block_on_top
from lag_ds.stacking.race import POLICIES


@dataclass(frozen=True, kw_only=True)
class StageSchedule:
    """One stage of the schedule."""

    steps: int
    """Training steps of this stage (its race's k steps included)."""
    num_new_layers: int = 0
    """Layers added at the start of this stage (0 only for stage 1, trained from scratch)."""
    space: str | None = None
    """Design space raced at this stage (``lag_ds.growth.parse_space`` text)."""
    fixed: str | None = None
    """A fixed operator instead of a race: ``last`` (duplicate the final ``num_new_layers``
    layers on top) or an operator string such as ``k=2,i0=0,b=2,init=duplicate``."""
    k: int = 0
    """Steps of the race (LAG@k's k; SH's last rung; settle's cap)."""
    policy: str = "lag"
    """Race policy: lag | sh | settle."""


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A whole stacking run."""

    train_config: str
    """``TrainConfig`` YAML shared by every job (depth and steps are set per stage)."""
    initial_layers: int
    """Depth of the stage-1 model."""
    stages: tuple[StageSchedule, ...]
    eval_interval: int = 10
    """Validation interval of every job."""
    dense_eval_steps: int = 0
    """Validate every step for this many steps after each growth."""


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """What one stage does, computed from the schedule alone."""

    index: int
    """1-based stage number."""
    layers_before: int
    layers_after: int
    start_step: int
    end_step: int
    operators: tuple[GrowthOperator, ...]
    """Empty for stage 1 (from scratch)."""
    k: int
    policy: str
    fixed: bool

    @property
    def candidate_steps(self) -> int:
        """Race steps of all candidates (the winner's k steps are part of the stage)."""
        return 0 if self.fixed or not self.operators else len(self.operators) * self.k


def load_schedule(path: str | Path) -> Schedule:
    """Read and validate a schedule; errors are one line naming the file and the stage."""
    schedule = load_yaml(Schedule, path)
    stages = tuple(load_stage(s, where=f"{path}: stage {i + 1}")
                   for i, s in enumerate(schedule.stages))
    schedule = Schedule(train_config=schedule.train_config, initial_layers=schedule.initial_layers,
                        stages=stages, eval_interval=schedule.eval_interval,
                        dense_eval_steps=schedule.dense_eval_steps)
    plan_schedule(schedule, where=str(path))
    return schedule


def load_stage(data: object, *, where: str) -> StageSchedule:
    if isinstance(data, StageSchedule):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping like {{steps: 100, num_new_layers: 2, "
                         f"space: ..., k: 20}}, got {data!r}")
    from lag_ds.config import load_dataclass

    return load_dataclass(StageSchedule, data, source=where)


def with_baseline(schedule: Schedule, baseline: str) -> Schedule:
    """The same schedule with every growth stage replaced by the fixed operator ``baseline``
    (``last``: last stacking), same steps: the budget of the model is unchanged."""
    stages = [schedule.stages[0]] + [
        StageSchedule(steps=s.steps, num_new_layers=s.num_new_layers, fixed=baseline, k=s.k or 1)
        for s in schedule.stages[1:]]
    return Schedule(train_config=schedule.train_config, initial_layers=schedule.initial_layers,
                    stages=tuple(stages), eval_interval=schedule.eval_interval,
                    dense_eval_steps=schedule.dense_eval_steps)


def _fixed_operator(text: str, *, num_layers: int, num_new_layers: int) -> GrowthOperator:
    if text == "last":
        return stack_last_block_on_top(num_layers, num_new_layers)
    op = parse_operator(text)
    if op.num_new_layers != num_new_layers:
        raise ValueError(f"fixed operator {text!r} adds {op.num_new_layers} layers, the stage "
                         f"num_new_layers is {num_new_layers}")
    op.validate(num_layers)
    return op


def plan_schedule(schedule: Schedule, *, where: str = "schedule") -> list[StagePlan]:
    """Per-stage plans; ``ValueError`` naming the stage for anything that cannot run."""
    if schedule.initial_layers < 1:
        raise ValueError(f"{where}: initial_layers must be >= 1, got {schedule.initial_layers}")
    if not schedule.stages:
        raise ValueError(f"{where}: no stages")
    if schedule.eval_interval < 1 or schedule.dense_eval_steps < 0:
        raise ValueError(f"{where}: eval_interval must be >= 1 and dense_eval_steps >= 0")
    plans: list[StagePlan] = []
    layers, step = schedule.initial_layers, 0
    for i, st in enumerate(schedule.stages):
        at = f"{where}: stage {i + 1}"
        if st.steps < 1:
            raise ValueError(f"{at}: steps must be >= 1, got {st.steps}")
        if i == 0:
            if st.num_new_layers or st.space or st.fixed or st.k:
                raise ValueError(f"{at}: the first stage trains {layers} layers from scratch; "
                                 "it takes only 'steps'")
            plans.append(StagePlan(index=1, layers_before=0, layers_after=layers, start_step=0,
                                   end_step=st.steps, operators=(), k=0, policy="lag",
                                   fixed=False))
            step = st.steps
            continue
        if st.num_new_layers < 1:
            raise ValueError(f"{at}: num_new_layers must be >= 1, got {st.num_new_layers}")
        if (st.space is None) == (st.fixed is None):
            raise ValueError(f"{at}: give exactly one of 'space' (a race) or 'fixed' "
                             "(an operator, e.g. last)")
        if st.policy not in POLICIES:
            raise ValueError(f"{at}: policy must be one of {POLICIES}, got {st.policy!r}")
        if not 1 <= st.k < st.steps:
            raise ValueError(f"{at}: k must be in 1..steps-1 ({st.steps - 1}), got {st.k}")
        try:
            if st.fixed is not None:
                ops = (_fixed_operator(st.fixed, num_layers=layers,
                                       num_new_layers=st.num_new_layers),)
            else:
                ops = tuple(parse_space(st.space, num_layers=layers,
                                        num_new_layers=st.num_new_layers))
        except ValueError as exc:
            raise ValueError(f"{at} ({layers} -> {layers + st.num_new_layers} layers): "
                             f"{str(exc).splitlines()[0]}") from None
        if not ops:
            raise ValueError(f"{at}: the design space {st.space!r} is empty")
        plans.append(StagePlan(index=i + 1, layers_before=layers,
                               layers_after=layers + st.num_new_layers, start_step=step,
                               end_step=step + st.steps, operators=ops, k=st.k,
                               policy=st.policy, fixed=st.fixed is not None))
        layers += st.num_new_layers
        step += st.steps
    return plans


def describe_plan(plans: list[StagePlan]) -> str:
    """The ``--dry-run`` table: layers, steps, candidates and cost per stage, and totals."""
    lines = [f"{'stage':>5}  {'layers':>9}  {'steps':>17}  {'candidates':>10}  {'k':>6}  "
             f"{'candidate-steps':>15}  operators"]
    for p in plans:
        layers = f"{p.layers_before}->{p.layers_after}" if p.operators else f"{p.layers_after}"
        ops = ("from scratch" if not p.operators else
               ("fixed " if p.fixed else f"{p.policy}: ") + ", ".join(o.name for o in p.operators))
        if len(ops) > 80:
            ops = ops[:77] + "..."
        lines.append(f"{p.index:>5}  {layers:>9}  {p.start_step:>8}->{p.end_step:<8}  "
                     f"{len(p.operators) or '-':>10}  {p.k or '-':>6}  {p.candidate_steps:>15,}  "
                     f"{ops}")
    extra = sum(p.candidate_steps - (p.k if p.operators and not p.fixed else 0) for p in plans)
    lines.append(f"total: {plans[-1].end_step:,} steps of the model, final depth "
                 f"{plans[-1].layers_after}; races: {sum(p.candidate_steps for p in plans):,} "
                 f"candidate-steps, of which {extra:,} are extra (losers' steps)")
    return "\n".join(lines)
