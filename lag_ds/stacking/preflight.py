"""Everything ``python -m lag_ds.stacking`` can check before it writes a byte or starts a job.

Why a separate pass: :func:`lag_ds.stacking.lag_run.run_lag` creates ``--out-dir``, builds
DeepSpeed's JIT ops (minutes) and may pretrain a base before it reads the base checkpoint or the
design space. A typo there must be one line naming the argument, exit 2, with nothing written --
not a failure after minutes, and not an output directory left behind.
"""

from __future__ import annotations

from pathlib import Path

from lag_ds.stacking.config import LagRunConfig


def check_lag_run(cfg: LagRunConfig) -> None:
    """``ValueError`` (one line naming the argument or file) on any input ``run_lag`` would reject
    later; reads the train config, the allocation and the base checkpoint, writes nothing."""
    from lag_ds.checkpoint.deepspeed_source import DeepSpeedCheckpoint
    from lag_ds.checkpoint.safe_load import check_pickle_globals
    from lag_ds.config import apply_overrides, load_yaml
    from lag_ds.families import get_family
    from lag_ds.growth import parse_space
    from lag_ds.stacking.allocations import parse_allocation
    from lag_ds.stacking.lag_run import _check_topology
    from lag_ds.stacking.stage import read_base
    from lag_ds.train.config import TrainConfig

    train = apply_overrides(load_yaml(TrainConfig, cfg.train_config), list(cfg.train_overrides))
    _check_topology(cfg, train, parse_allocation(cfg.allocation))
    if cfg.base_checkpoint:
        base = Path(cfg.base_checkpoint)
        if not base.is_dir():
            raise ValueError(f"--base-checkpoint {base}: no such directory")
        out, src = Path(cfg.out_dir).resolve(), base.resolve()
        if out == src or src in out.parents:
            raise ValueError(f"--out-dir {cfg.out_dir}: inside --base-checkpoint {base}; "
                             "write elsewhere")
        base_step, layers = read_base(base)
        ck = DeepSpeedCheckpoint(base)  # the full topology check surgery will do, now
        for path in sorted(ck.tag_dir.rglob("*.pt")):
            check_pickle_globals(path)
        where = "--base-checkpoint"
    else:
        base_step = cfg.base_steps if cfg.base_steps is not None else train.train_steps
        if base_step <= 0:
            raise ValueError(f"--base-steps must be positive, got {base_step}")
        layers = train.num_layers or get_family(train.family).get_preset(train.preset).num_layers
        where = "the base run"
    if cfg.total_steps <= base_step + cfg.lag_steps:
        raise ValueError(f"--total-steps {cfg.total_steps} must exceed {where}'s step "
                         f"{base_step} + --lag-steps {cfg.lag_steps}")
    try:
        parse_space(cfg.space, num_layers=layers, num_new_layers=cfg.grow_layers)
    except ValueError as exc:
        raise ValueError(f"--space {cfg.space!r} for {layers} layers: "
                         f"{str(exc).splitlines()[0]}") from None
