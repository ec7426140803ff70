"""One LAG growth stage end to end: base → candidates → k-step race → LAG@k → promoted winner.

Steps, each idempotent so that re-running the same command after a crash (or a SIGKILL of this
orchestrator) resumes without redoing finished work (RELIABILITY.md #8):

1. **base**: the given checkpoint, or base pretraining as one job on the whole allocation;
2. **base_universal**: the base resharded once into DeepSpeed's universal layout (written
   atomically; reused when its manifest exists);
3. **candidates/<op>/init**: one grown checkpoint per operator, hard-linking every file it shares
   with base_universal (only new random/zeroed tensors are written);
4. **race**: every candidate trains ``lag_steps`` steps through the real ``deepspeed`` launcher on
   slices of the allocation, concurrently, in waves (:func:`lag_ds.launch.run_jobs`, journaled:
   finished candidates never rerun, live ones are adopted);
5. **selection.json**: LAG@k over the candidates' validation curves (plus LAG@0), deterministic,
   failed/NaN candidates excluded; also written to TensorBoard as text + hparams;
6. **promotion**: the winner's own step-k checkpoint is resharded to the whole allocation and
   trained to ``total_steps`` with the same data order and LR schedule (journaled job).

The orchestrator knows models only through ``tools``-level functions (growth plans, checkpoint
adapters); the launcher and selector know nothing of models.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lag_ds.checkpoint.deepspeed_grow import grow_deepspeed_checkpoint
from lag_ds.checkpoint.deepspeed_source import DeepSpeedCheckpoint
from lag_ds.checkpoint.manifest import MANIFEST_NAME
from lag_ds.checkpoint.universal_links import disk_usage, materialise_candidate
from lag_ds.config import apply_overrides, load_yaml
from lag_ds.growth import parse_space, plan_growth
from lag_ds.launch import Allocation, JobSpec, ProgressReporter, run_jobs
from lag_ds.launch.progress import format_duration
from lag_ds.select import load_curve, read_records, select_lag, write_selection_json
from lag_ds.stacking.allocations import parse_allocation
from lag_ds.stacking.config import LagRunConfig
from lag_ds.train.config import TrainConfig
from lag_ds.train.metrics import STATUS_PREFIX


def log(msg: str) -> None:
    print(f"[lag] {msg}", file=sys.stderr, flush=True)


# Variables of the orchestrator's environment every job gets, on every host: the
# communication libraries' settings (e.g. GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME on a cluster)
# and the extension build cache.  DeepSpeed's pdsh runner forwards only NCCL*/PYTHON* by itself.
FORWARDED_ENV_PREFIXES = ("GLOO_", "NCCL_", "TORCH_EXTENSIONS_DIR", "TP_SOCKET_IFNAME")


def _train_job(cfg: LagRunConfig, name: str, run_dir: Path, sets: list[str], *,
               total_steps: int) -> JobSpec:
    args = ["--config", str(Path(cfg.train_config).resolve())]
    for item in [*cfg.train_overrides, f"run_dir={run_dir.resolve()}", *sets]:
        args += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return JobSpec(name=name, script="lag_ds.train", module=True, args=args, run_dir=run_dir,
                   env=env,
                   total_steps=total_steps, status_prefix=STATUS_PREFIX)


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
              if "train/loss" in r and "wall_time" in r]
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


def _run(cfg: LagRunConfig, allocation: Allocation, jobs: list[JobSpec], *, journal: Path,
         slots_per_slice: int) -> dict:
    return run_jobs(jobs, allocation, slots_per_slice=slots_per_slice, journal_path=journal,
                    hang_timeout_s=cfg.hang_timeout_s, max_retries=cfg.max_retries, poll_interval_s=1.0,
                    progress=ProgressReporter(), base_port=cfg.base_port)


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


def _complete(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def run_lag(cfg: LagRunConfig) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_cfg = apply_overrides(load_yaml(TrainConfig, cfg.train_config), list(cfg.train_overrides))
    allocation = parse_allocation(cfg.allocation)
    all_slots = allocation.num_slots
    tb_dir = (out / "tb").resolve()
    _check_topology(cfg, train_cfg, allocation)
    clock = PhaseClock()

    # 1. base checkpoint
    base_wall, base_steps_run = None, 0
    if cfg.base_checkpoint:
        base = Path(cfg.base_checkpoint)
    else:
        steps = cfg.base_steps or train_cfg.train_steps
        job = _train_job(cfg, "base", out / "base", [f"train_steps={steps}", f"tb_dir={tb_dir}",
                                                     "tb_run_name=base"], total_steps=steps)
        with clock.phase("base", f"pretraining {steps} steps on {all_slots} slot(s) "
                                 f"(log: {job.log_path})"):
            result = _run(cfg, allocation, [job], journal=out / "journal-base.jsonl",
                          slots_per_slice=all_slots)["base"]
        if result.state != "finished":
            raise RuntimeError(f"base pretraining failed: {result.reason} (see {job.log_path})")
        base = out / "base" / "checkpoints"
        base_wall, base_steps_run = clock.seconds["base"], steps
    source = DeepSpeedCheckpoint(base)
    base_step, num_layers = source.global_steps, source.num_layers
    if source.zero_stage == 0:
        raise ValueError(f"{base}: LAG candidates need a ZeRO-1/2 base (universal layout); this one is ZeRO-0")
    ops = parse_space(cfg.space, num_layers=num_layers, num_new_layers=cfg.grow_layers)
    if cfg.total_steps <= base_step + cfg.lag_steps:
        raise ValueError(f"--total-steps {cfg.total_steps} must exceed base step {base_step} + --lag-steps {cfg.lag_steps}")
    num_slices = len(allocation.split(cfg.slots_per_slice))
    log(f"base: {num_layers} layers at step {base_step}; {len(ops)} candidates; LAG@{cfg.lag_steps}")
    estimate = _estimate_rest(cfg, base_metrics=out / "base" / "metrics.jsonl", base_wall_s=base_wall,
                              num_candidates=len(ops), num_slices=num_slices,
                              base_steps_run=base_steps_run, all_slots=all_slots,
                              promoted_steps=cfg.total_steps - base_step - cfg.lag_steps)
    if estimate:
        log(estimate)

    # 2. base in universal layout, once; 3. candidates (hard links to the base where possible)
    base_universal = out / "base_universal"
    cand_root = out / "candidates"
    with clock.phase("candidates", f"growing {len(ops)} candidate checkpoints "
                                   f"({num_layers} -> {num_layers + cfg.grow_layers} layers)"):
        if not _complete(base_universal):
            log("resharding the base into DeepSpeed's universal layout")
            grow_deepspeed_checkpoint(base, base_universal, None, show_progress=False)
        del source
        cand_root.mkdir(exist_ok=True)
        for op in ops:
            init = cand_root / op.name / "init"
            if not _complete(init):
                init.parent.mkdir(exist_ok=True)
                materialise_candidate(base_universal, init, plan_growth(op, num_layers, seed=cfg.seed),
                                      optimizer_state=cfg.optimizer_state)
        usage = disk_usage([base_universal, *[cand_root / op.name / "init" for op in ops]])
        log(f"candidates on disk: {usage['bytes_on_disk'] / 1e6:.1f} MB "
            f"(would be {usage['bytes_if_copied'] / 1e6:.1f} MB as copies)")

    # 4. the race: k steps each, concurrently on slices
    decision = base_step + cfg.lag_steps
    jobs = [_train_job(cfg, op.name, cand_root / op.name / "run", [
        f"init_from={(cand_root / op.name / 'init').resolve()}", f"num_layers={num_layers + cfg.grow_layers}",
        f"train_steps={decision}", f"eval_interval={cfg.eval_interval}", f"save_interval={cfg.lag_steps}",
        "keep_checkpoints=1", f"tb_dir={tb_dir}", f"tb_run_name={op.name}"], total_steps=decision)
        for op in ops]
    with clock.phase("race", f"{len(ops)} candidates x {cfg.lag_steps} steps on {num_slices} "
                             f"slice(s) of {cfg.slots_per_slice} slot(s)"):
        results = _run(cfg, allocation, jobs, journal=out / "journal-candidates.jsonl",
                       slots_per_slice=cfg.slots_per_slice)

    # 5. selection
    curves, failed = {}, {}
    for op in ops:
        r = results[op.name]
        if r.state != "finished":
            failed[op.name] = r.reason
        path = cand_root / op.name / "run" / "metrics.jsonl"
        if path.exists():
            curves[op.name] = load_curve(path, name=op.name)
    selection = select_lag(curves, k=cfg.lag_steps, base_step=base_step, smoothing_window=cfg.smoothing_window,
                           failed=failed)
    extra = {"operators": {op.name: asdict(op) for op in ops}, "base_checkpoint": str(Path(base).resolve()),
             "num_layers": {"base": num_layers, "grown": num_layers + cfg.grow_layers},
             "disk_usage": usage, "config": asdict(cfg)}
    write_selection_json(out / "selection.json", selection, data_seed=train_cfg.data_seed, extra=extra)
    _selection_to_tensorboard(tb_dir / "selection", selection, ops, step=decision)
    log(f"LAG@{cfg.lag_steps} winner: {selection.winner} (LAG@0 would pick {selection.lag0_winner})")

    # 6. promotion: the winner's step-k checkpoint, resharded to the whole allocation
    winner_ckpt = cand_root / selection.winner / "run" / "checkpoints"
    promoted_init = out / "promoted" / "init"
    promoted = _train_job(cfg, "promoted", out / "promoted" / "run", [
        f"init_from={promoted_init.resolve()}", f"num_layers={num_layers + cfg.grow_layers}",
        f"train_steps={cfg.total_steps}", f"tb_dir={tb_dir}", f"tb_run_name=promoted-{selection.winner}"],
        total_steps=cfg.total_steps)
    with clock.phase("promotion", f"{selection.winner}: step {decision} -> {cfg.total_steps} on "
                                  f"{all_slots} slot(s)"):
        if not _complete(promoted_init):
            promoted_init.parent.mkdir(parents=True, exist_ok=True)
            grow_deepspeed_checkpoint(winner_ckpt, promoted_init, None,
                                      target_dp=all_slots // train_cfg.tensor_parallel, show_progress=False)
        result = _run(cfg, allocation, [promoted], journal=out / "journal-promoted.jsonl",
                      slots_per_slice=all_slots)["promoted"]
    if result.state != "finished":
        raise RuntimeError(f"promoted run failed: {result.reason} (see {promoted.log_path})")
    final = load_curve(promoted.metrics_path, name="promoted")
    summary = {"winner": selection.winner, "lag0_winner": selection.lag0_winner, "decision_step": decision,
               "final_step": int(final.steps[-1]), "final_val_loss": float(final.values[-1]),
               "selection": str((out / "selection.json").resolve()), "tensorboard": str(tb_dir),
               "phase_wall_s": {k: round(v, 1) for k, v in clock.seconds.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(selection, failed, summary))
    print(clock.table())
    return summary


def _selection_to_tensorboard(tb_dir: Path, selection, ops, *, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    rows = ["| rank | candidate | LAG@k loss | LAG@0 loss |", "|---|---|---|---|"]
    rows += [f"| {r.rank} | {r.name} | {r.lag_k_loss:.4f} | {r.lag_0_loss if r.lag_0_loss is None else f'{r.lag_0_loss:.4f}'} |"
             for r in selection.ranking]
    rows += [f"| - | {n} | excluded: {why} | |" for n, why in selection.excluded.items()]
    by_name = {op.name: op for op in ops}
    with SummaryWriter(str(tb_dir)) as writer:
        writer.add_text("selection", f"winner **{selection.winner}** (LAG@{selection.k}); "
                        f"LAG@0 would pick {selection.lag0_winner}\n\n" + "\n".join(rows), global_step=step)
        for r in selection.ranking:
            op = by_name[r.name]
            writer.add_hparams({"candidate": r.name, "start": op.start, "block_size": op.block_size, "init": op.init},
                               {"hparam/lag_k_loss": r.lag_k_loss, "hparam/rank": r.rank}, run_name=r.name)


def format_summary(selection, failed: dict[str, str], summary: dict[str, Any]) -> str:
    lines = [f"LAG@{selection.k} winner: {selection.winner}   (LAG@0 would pick: {selection.lag0_winner})", "",
             f"{'rank':>4}  {'candidate':<24} {'LAG@0':>8} {'LAG@k':>8}"]
    for r in selection.ranking:
        lag0 = "-" if r.lag_0_loss is None else f"{r.lag_0_loss:.4f}"
        lines.append(f"{r.rank:>4}  {r.name:<24} {lag0:>8} {r.lag_k_loss:>8.4f}")
    for name, why in selection.excluded.items():
        lines.append(f"{'-':>4}  {name:<24} excluded: {why}")
    lines += ["", f"promoted {summary['winner']} to step {summary['final_step']}: val loss {summary['final_val_loss']:.4f}",
              f"selection: {summary['selection']}",
              f"curves:    tensorboard --logdir {summary['tensorboard']}"]
    return "\n".join(lines)
