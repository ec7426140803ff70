"""One LAG growth stage end to end: base -> candidates -> race -> decision -> promoted winner.

``ul2_grow.sh`` / ``python -m lag_ds.stacking``: an optional base run on the whole allocation,
then the four steps of :mod:`lag_ds.stacking.stage` (prepare, race, decide, promote), each
idempotent so that re-running the same command after a crash (or a SIGKILL of this
orchestrator) resumes without redoing finished work (RELIABILITY.md #8).  This module adds what
a person watching the run needs: what each phase does, an estimate of the rest of the run from
the base run's measured speed, the wall time of each phase, and the summary table.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lag_ds.atomic_io import atomic_write_text
from lag_ds.config import apply_overrides, load_yaml
from lag_ds.growth import parse_space
from lag_ds.launch import prepare_deepspeed_ops
from lag_ds.launch.progress import format_duration
from lag_ds.metrics_schema import TRAIN_LOSS, WALL_TIME
from lag_ds.select import read_records
from lag_ds.stacking.allocations import parse_allocation
from lag_ds.stacking.config import LagRunConfig
from lag_ds.stacking.kill_point import kill_point
from lag_ds.stacking.stage import (
    Launch,
    StageSpec,
    decide,
    prepare,
    promote,
    race,
    read_base,
    train_job,
)
from lag_ds.train.config import TrainConfig


def log(msg: str) -> None:
    print(f"[lag] {msg}", file=sys.stderr, flush=True)


class PhaseClock:
    """Wall time of each phase of the run, logged as it starts and ends, summed at the end."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.monotonic()

    @contextmanager
    def phase(self, name: str, what: str) -> Iterator[None]:
        log(f"{name}: {what}")
        t0 = time.monotonic()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - t0
        log(f"{name}: done in {format_duration(self.seconds[name])}")

    def table(self) -> str:
        total = time.monotonic() - self._start
        parts = [f"{name} {format_duration(sec)}" for name, sec in self.seconds.items()]
        return "wall time: " + ", ".join(parts) + f"; total {format_duration(total)}"


def _speed_of(metrics_path: Path) -> float | None:
    """Seconds per step of a finished job, from its metrics' wall times (None if unknown)."""
    if not metrics_path.exists():
        return None
    points = [(r["step"], r["wall_time"]) for r in read_records(metrics_path)
              if TRAIN_LOSS in r and WALL_TIME in r]
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return None
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def _estimate_rest(cfg: LagRunConfig, *, base_metrics: Path, base_wall_s: float | None,
                   num_candidates: int, num_slices: int, base_steps_run: int,
                   promoted_steps: int, all_slots: int) -> str | None:
    """A rough ETA for race + promotion from the base run's measured speed and start-up time.

    A candidate on a slice of s slots takes about (all slots / s) times the base's time per
    step (the same global batch on fewer ranks), plus the same start-up cost."""
    step_s = _speed_of(base_metrics)
    if step_s is None or base_wall_s is None:
        return None
    startup = max(0.0, base_wall_s - base_steps_run * step_s)
    waves = -(-num_candidates // num_slices)
    race = waves * (startup + cfg.lag_steps * step_s * all_slots / cfg.slots_per_slice)
    promotion = startup + promoted_steps * step_s
    return (f"estimated: race ~{format_duration(race)} ({num_candidates} candidates x "
            f"{cfg.lag_steps} steps in {waves} wave(s)), promotion ~{format_duration(promotion)} "
            f"({promoted_steps} steps), from the base run's {step_s:.2f} s/step on {all_slots} "
            f"slot(s) and {format_duration(startup)} start-up")


def _check_topology(cfg: LagRunConfig, train_cfg: TrainConfig, allocation) -> None:
    """Fail before any job starts if the slices or batch sizes cannot work (not after the base run)."""
    allocation.split(cfg.slots_per_slice)  # raises with the reason when slices cannot tile
    for what, slots in (("--slots-per-slice", cfg.slots_per_slice), ("the whole allocation", allocation.num_slots)):
        if slots % train_cfg.tensor_parallel:
            raise ValueError(f"{what}: {slots} slots not divisible by tensor_parallel={train_cfg.tensor_parallel}")
        dp = slots // train_cfg.tensor_parallel
        if train_cfg.global_batch_size % (train_cfg.micro_batch_size * dp):
            raise ValueError(f"{what}: global_batch_size={train_cfg.global_batch_size} not divisible by "
                             f"micro_batch_size x DP = {train_cfg.micro_batch_size} x {dp}")


def run_lag(cfg: LagRunConfig) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_cfg = apply_overrides(load_yaml(TrainConfig, cfg.train_config), list(cfg.train_overrides))
    allocation = parse_allocation(cfg.allocation)
    all_slots = allocation.num_slots
    tb_dir = (out / "tb").resolve()
    _check_topology(cfg, train_cfg, allocation)
    launch = Launch(allocation=allocation, slots_per_slice=cfg.slots_per_slice,
                    hang_timeout_s=cfg.hang_timeout_s, max_retries=cfg.max_retries,
                    base_port=cfg.base_port,
                    launcher=Launch.launcher_for(cfg.allocation))
    policy = cfg.race_policy()
    clock = PhaseClock()
    # Build/load DeepSpeed's JIT ops once, here, clearing a stale build lock left by a killed
    # process: otherwise every job of the race would wait on it forever (FACTS: stale JIT lock).
    ops = prepare_deepspeed_ops(timeout_s=cfg.hang_timeout_s * 3, log=log)
    log(f"DeepSpeed ops ready in {ops.seconds:.0f} s ({', '.join(ops.ops.values()) or 'none'})")

    # 1. base checkpoint
    base_wall, base_steps_run = None, 0
    if cfg.base_checkpoint:
        base = Path(cfg.base_checkpoint)
    else:
        steps = cfg.base_steps or train_cfg.train_steps
        job = train_job(train_cfg, "base", out / "base", total_steps=steps, tb_dir=str(tb_dir),
                        tb_run_name="base")
        with clock.phase("base", f"pretraining {steps} steps on {all_slots} slot(s) "
                                 f"(log: {job.log_path})"):
            result = launch.run([job], journal=out / "journal-base.jsonl", whole=True)["base"]
        if result.state != "finished":
            raise RuntimeError(f"base pretraining failed: {result.reason} (see {job.log_path})")
        base = out / "base" / "checkpoints"
        base_wall, base_steps_run = clock.seconds["base"], steps
    base_step, num_layers = read_base(base)
    if cfg.total_steps <= base_step + cfg.lag_steps:
        raise ValueError(f"--total-steps {cfg.total_steps} must exceed base step {base_step} + "
                         f"--lag-steps {cfg.lag_steps}")
    spec = StageSpec(out_dir=out, train=train_cfg, base=base, num_new_layers=cfg.grow_layers,
                     space=cfg.space, policy=policy, total_steps=cfg.total_steps,
                     eval_interval=cfg.eval_interval, dense_eval_steps=cfg.dense_eval_steps,
                     dense_eval_interval=cfg.dense_eval_interval,
                     smoothing_window=cfg.smoothing_window, optimizer_state=cfg.optimizer_state,
                     seed=cfg.seed, study=cfg.study, tb_dir=tb_dir, name="stage1")
    num_ops = len(parse_space(cfg.space, num_layers=num_layers, num_new_layers=cfg.grow_layers))
    num_slices = len(allocation.split(cfg.slots_per_slice))
    log(f"base: {num_layers} layers at step {base_step}; {num_ops} candidates; "
        f"{policy.describe()}{'; study mode' if cfg.study else ''}")
    estimate = _estimate_rest(cfg, base_metrics=out / "base" / "metrics.jsonl",
                              base_wall_s=base_wall, num_candidates=num_ops,
                              num_slices=num_slices, base_steps_run=base_steps_run,
                              all_slots=all_slots,
                              promoted_steps=cfg.total_steps - base_step - cfg.lag_steps)
    if estimate:
        log(estimate)

    # 2.-3. candidates in universal layout, hard-linked to the base
    with clock.phase("candidates", f"growing {num_ops} candidate checkpoints "
                                   f"({num_layers} -> {num_layers + cfg.grow_layers} layers)"):
        prepared = prepare(spec)
        usage = prepared.disk_usage
        log(f"candidates on disk: {usage['bytes_on_disk'] / 1e6:.1f} MB "
            f"(would be {usage['bytes_if_copied'] / 1e6:.1f} MB as copies)")

    # 4. the race, concurrently on slices, until the policy decides
    with clock.phase("race", f"{num_ops} candidates, {policy.describe()}, on {num_slices} "
                             f"slice(s) of {cfg.slots_per_slice} slot(s)"):
        raced = race(spec, prepared, launch, say=log)

    # 5. selection
    selection = decide(spec, prepared, raced, extra={"config": asdict(cfg)})
    kill_point("decided")
    log(f"{policy.describe()} winner: {selection.winner} (LAG@0 would pick "
        f"{selection.lag0_winner}); {raced.candidate_steps} candidate-steps")

    # 6. promotion (study mode: every candidate continues, the winner's run is the promoted one)
    what = (f"every candidate to step {cfg.total_steps} on its slice (study)" if cfg.study else
            f"{selection.winner}: step {selection.decision_step} -> {cfg.total_steps} on "
            f"{all_slots} slot(s)")
    with clock.phase("promotion", what):
        promoted = promote(spec, prepared, raced, selection, launch)
    summary = {"winner": selection.winner, "lag0_winner": selection.lag0_winner,
               "policy": policy.describe(), "decision_step": selection.decision_step,
               "candidate_steps": raced.candidate_steps, "study": cfg.study,
               "promoted_run": str(promoted.run_dir.resolve()),
               "final_step": promoted.final_step, "final_val_loss": promoted.final_val_loss,
               "selection": str((out / "selection.json").resolve()), "tensorboard": str(tb_dir),
               "phase_wall_s": {k: round(v, 1) for k, v in clock.seconds.items()}}
    # Last and atomic: a summary.json that exists is whole and says the run is done, even if
    # the orchestrator is killed while writing it.
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(format_summary(selection, raced.failed, summary))
    print(clock.table())
    return summary


def format_summary(selection, failed: dict[str, str], summary: dict[str, Any]) -> str:
    lines = [f"{summary['policy']} winner: {selection.winner}   (LAG@0 would pick: "
             f"{selection.lag0_winner}; {summary['candidate_steps']} candidate-steps)", "",
             f"{'rank':>4}  {'candidate':<24} {'LAG@0':>8} {'LAG@k':>8}"]
    for r in selection.ranking:
        lag0 = "-" if r.lag_0_loss is None else f"{r.lag_0_loss:.4f}"
        lines.append(f"{r.rank:>4}  {r.name:<24} {lag0:>8} {r.lag_k_loss:>8.4f}")
    for name, why in selection.excluded.items():
        lines.append(f"{'-':>4}  {name:<24} excluded: {why}")
    how = "study run of " if summary["study"] else "promoted "
    lines += ["", f"{how}{summary['winner']} to step {summary['final_step']}: val loss "
                  f"{summary['final_val_loss']:.4f} ({summary['promoted_run']})",
              f"selection: {summary['selection']}",
              f"curves:    tensorboard --logdir {summary['tensorboard']}"]
    return "\n".join(lines)
