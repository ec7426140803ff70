"""Adaptive gradual stacking: LAG at every stage of stage-wise growth (paper section 4.2).

``python -m lag_ds.stacking.adaptive --schedule FILE`` (and ``launch_scripts/adaptive_stack.sh``)
trains stage 1 from scratch, then for every later stage runs the same four steps as one LAG run
(:mod:`lag_ds.stacking.stage`: prepare -> race -> decide -> promote) on the previous stage's
final checkpoint.  ``--baseline last`` also runs the same schedule with "duplicate the final b
layers on top" at every stage (Reddi et al.'s last stacking, the paper's Table 4 baseline),
sharing stage 1, and prints both final losses side by side.

Resumable everywhere: a stage is recorded in ``OUT/stages.json`` (written atomically) once its
promoted run has finished, and a recorded stage is never redone; an unfinished stage is resumed
through its own journals (finished candidates are not relaunched, live jobs are adopted).

TensorBoard (``OUT/tb``): the model's validation loss as one continuous curve across stages (run
``model``: every stage's promoted run writes there, with ``model/num_layers`` marking the stage
boundaries), and each stage's candidates overlaid in their own group ``stage<s>/<operator>``.

Example::

    python -m lag_ds.stacking.adaptive --schedule launch_scripts/configs/stacking/small_cpu.yaml \\
        --out-dir runs/adaptive --baseline last
    python -m lag_ds.stacking.adaptive --schedule launch_scripts/configs/stacking/bert_large_paper.yaml \\
        --dry-run
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lag_ds.atomic_io import atomic_write_text
from lag_ds.config import apply_overrides, load_yaml
from lag_ds.launch import prepare_deepspeed_ops
from lag_ds.select import load_curve
from lag_ds.stacking.allocations import parse_allocation
from lag_ds.stacking.lag_run import PhaseClock, log
from lag_ds.stacking.race import RacePolicy
from lag_ds.stacking.schedule import (
    Schedule,
    StagePlan,
    describe_plan,
    load_schedule,
    plan_schedule,
    with_baseline,
)
from lag_ds.stacking.stage import Launch, StageSpec, decide, prepare, promote, race, train_job
from lag_ds.train.config import TrainConfig

STAGE_LOG = "stages.json"


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        return list(data["stages"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}: not a stage log written by lag_ds (delete it to start over)") \
            from None


def _write_log(path: Path, stages: list[dict[str, Any]], *, schedule: str) -> None:
    atomic_write_text(path, json.dumps({"schedule": schedule, "stages": stages}, indent=1) + "\n")


def _final(run_dir: Path) -> tuple[int, float]:
    curve = load_curve(run_dir / "metrics.jsonl", name=run_dir.name)
    return int(curve.steps[-1]), float(curve.values[-1])


def run_schedule(schedule: Schedule, *, out: Path, train: TrainConfig, launch: Launch,
                 schedule_path: str, stage1: Path | None = None, label: str = "adaptive",
                 seed: int = 0) -> dict[str, Any]:
    """Run every stage of ``schedule`` into ``out`` (see the module docstring).

    ``stage1``: a finished stage-1 run dir to reuse instead of training one (the baseline shares
    the adaptive run's stage 1, so both start from the very same model)."""
    plans = plan_schedule(schedule, where=schedule_path)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / STAGE_LOG
    done = _read_log(log_path)
    tb = (out / "tb").resolve()
    clock = PhaseClock()
    for plan in plans:
        if plan.index <= len(done):
            rec = done[plan.index - 1]
            log(f"{label} stage {plan.index}: done before ({rec['layers']} layers, val loss "
                f"{rec['final_val_loss']:.4f}); skipped")
            continue
        if plan.index == 1:
            rec = _stage_one(plan, schedule=schedule, out=out, train=train, launch=launch,
                             tb=tb, stage1=stage1, clock=clock, label=label)
        else:
            base = Path(done[-1]["checkpoint"])
            rec = _growth_stage(plan, schedule=schedule, out=out, train=train, launch=launch,
                                tb=tb, base=base, clock=clock, label=label, seed=seed)
        _mark_stage(tb, plan, rec)
        done.append(rec)
        _write_log(log_path, done, schedule=schedule_path)
    final = done[-1]
    return {"label": label, "final_step": final["end_step"], "final_val_loss":
            final["final_val_loss"], "layers": final["layers"],
            "candidate_steps": sum(r.get("candidate_steps", 0) for r in done),
            "stages": done, "stage_log": str(log_path.resolve())}


def _mark_stage(tb: Path, plan: StagePlan, rec: dict[str, Any]) -> None:
    """Stage boundary on the model's curve: ``model/num_layers`` steps up at the stage's start,
    and a text line naming the stage's operator."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tb / "model")) as writer:
        writer.add_scalar("model/num_layers", plan.layers_after, global_step=plan.start_step)
        what = (f"stage {plan.index}: {plan.layers_after} layers from scratch" if plan.index == 1
                else f"stage {plan.index}: {plan.layers_before} -> {plan.layers_after} layers "
                     f"with {rec['winner']} (LAG@0 would pick {rec['lag0_winner']})")
        writer.add_text("stages", what, global_step=plan.start_step)


def _stage_one(plan: StagePlan, *, schedule: Schedule, out: Path, train: TrainConfig,
               launch: Launch, tb: Path, stage1: Path | None, clock: PhaseClock,
               label: str) -> dict[str, Any]:
    run_dir = stage1 if stage1 is not None else out / "stage1" / "run"
    if stage1 is None:
        job = train_job(train, "stage1", run_dir, total_steps=plan.end_step,
                        num_layers=plan.layers_after, eval_interval=schedule.eval_interval,
                        tb_dir=str(tb), tb_run_name="model")
        with clock.phase(f"{label} stage 1", f"{plan.layers_after} layers from scratch, "
                                             f"{plan.end_step} steps"):
            result = launch.run([job], journal=out / "stage1" / "journal.jsonl", whole=True)
        if result["stage1"].state != "finished":
            raise RuntimeError(f"stage 1 failed: {result['stage1'].reason} "
                               f"(see {job.log_path})")
    step, loss = _final(run_dir)
    return {"stage": 1, "layers": plan.layers_after, "start_step": 0, "end_step": step,
            "final_val_loss": loss, "checkpoint": str((run_dir / "checkpoints").resolve()),
            "run_dir": str(run_dir.resolve()), "candidate_steps": 0}


def _growth_stage(plan: StagePlan, *, schedule: Schedule, out: Path, train: TrainConfig,
                  launch: Launch, tb: Path, base: Path, clock: PhaseClock, label: str,
                  seed: int) -> dict[str, Any]:
    st = schedule.stages[plan.index - 1]
    spec = StageSpec(out_dir=out / f"stage{plan.index}", train=train, base=base,
                     num_new_layers=st.num_new_layers, space=st.space or f"fixed: {st.fixed}",
                     operators=plan.operators,
                     policy=RacePolicy(name=st.policy, k=plan.k), total_steps=plan.end_step,
                     eval_interval=schedule.eval_interval,
                     dense_eval_steps=schedule.dense_eval_steps, seed=seed,
                     tb_dir=tb / f"stage{plan.index}", promoted_tb=(tb, "model"),
                     name=f"stage{plan.index}")
    what = (f"{plan.layers_before} -> {plan.layers_after} layers, "
            + (f"fixed {plan.operators[0].name}" if plan.fixed else
               f"{len(plan.operators)} candidates, {spec.policy.describe()}")
            + f", to step {plan.end_step}")
    with clock.phase(f"{label} stage {plan.index}", what):
        prepared = prepare(spec)
        raced = race(spec, prepared, launch, say=log)
        selection = decide(spec, prepared, raced, extra={"schedule_stage": asdict(st)})
        log(f"{label} stage {plan.index}: winner {selection.winner} (LAG@0 would pick "
            f"{selection.lag0_winner})")
        promoted = promote(spec, prepared, raced, selection, launch)
    ranking = {r.name: {"lag_k": r.lag_k_loss, "lag_0": r.lag_0_loss}
               for r in selection.ranking}
    return {"stage": plan.index, "layers": plan.layers_after, "start_step": plan.start_step,
            "end_step": promoted.final_step, "winner": selection.winner,
            "lag0_winner": selection.lag0_winner, "policy": spec.policy.describe(),
            "candidates": [op.name for op in plan.operators], "losses": ranking,
            "excluded": dict(selection.excluded), "candidate_steps": raced.candidate_steps,
            "final_val_loss": promoted.final_val_loss,
            "checkpoint": str((promoted.run_dir / "checkpoints").resolve()),
            "run_dir": str(promoted.run_dir.resolve()),
            "selection": str((spec.out_dir / "selection.json").resolve())}


def side_by_side(results: list[dict[str, Any]]) -> str:
    lines = [f"{'run':<10} {'layers':>6} {'final step':>10} {'final val loss':>15} "
             f"{'candidate-steps':>16}"]
    for r in results:
        lines.append(f"{r['label']:<10} {r['layers']:>6} {r['final_step']:>10} "
                     f"{r['final_val_loss']:>15.4f} {r['candidate_steps']:>16,}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from lag_ds.cli import OneLineParser

    p = OneLineParser(
        prog="python -m lag_ds.stacking.adaptive", description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Example::"):].replace("Example::", "examples:"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", required=True, help="stage schedule YAML "
                   "(lag_ds/stacking/schedule.py; launch_scripts/configs/stacking/)")
    p.add_argument("--out-dir", default="runs/adaptive",
                   help="output: adaptive/ (and last/ with --baseline), summary.json")
    p.add_argument("--baseline", choices=["none", "last"], default="none",
                   help="also run last stacking with the same schedule and compare")
    p.add_argument("--dry-run", action="store_true",
                   help="print every stage's layers, steps, candidates and cost; run nothing")
    p.add_argument("--set", dest="train_overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="TrainConfig override for every job (repeatable)")
    p.add_argument("--allocation", default="local:2",
                   help="local:N | hostfile:PATH | slurm | include:HOST:IDS[@HOST:IDS]")
    p.add_argument("--slots-per-slice", type=int, default=1,
                   help="slots per candidate job (candidates run concurrently on slices)")
    p.add_argument("--hang-timeout-s", type=float, default=300.0,
                   help="a job with no progress for this long is killed and marked failed")
    p.add_argument("--max-retries", type=int, default=0)
    p.add_argument("--base-port", type=int, default=29600)
    p.add_argument("--seed", type=int, default=0, help="seed of random-init layers")
    return p


def main(argv: list[str] | None = None) -> int:
    from lag_ds.cli import parse_or_exit_code

    args = parse_or_exit_code(build_parser(), argv)
    if isinstance(args, int):  # --help, or a usage error already printed as one line
        return args
    try:
        schedule = load_schedule(args.schedule)
        plans = plan_schedule(schedule, where=args.schedule)
        if args.dry_run:
            print(describe_plan(plans))
            if args.baseline == "last":
                print("\nlast stacking (--baseline last):")
                print(describe_plan(plan_schedule(with_baseline(schedule, "last"),
                                                  where=args.schedule)))
            return 0
        train = apply_overrides(load_yaml(TrainConfig, schedule.train_config),
                                list(args.train_overrides))
        launch = Launch(allocation=parse_allocation(args.allocation),
                        slots_per_slice=args.slots_per_slice, hang_timeout_s=args.hang_timeout_s,
                        max_retries=args.max_retries, base_port=args.base_port,
                    launcher=Launch.launcher_for(args.allocation))
        launch.allocation.split(args.slots_per_slice)
        out = Path(args.out_dir)
        ops = prepare_deepspeed_ops(timeout_s=args.hang_timeout_s * 3, log=log)
        log(f"DeepSpeed ops ready in {ops.seconds:.0f} s")
        results = [run_schedule(schedule, out=out / "adaptive", train=train, launch=launch,
                                schedule_path=args.schedule, seed=args.seed)]
        if args.baseline == "last":
            stage1 = Path(results[0]["stages"][0]["run_dir"])
            results.append(run_schedule(with_baseline(schedule, "last"), out=out / "last",
                                        train=train, launch=launch, schedule_path=args.schedule,
                                        stage1=stage1, label="last", seed=args.seed))
    except ValueError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = {"schedule": args.schedule, "results": results}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    print(side_by_side(results))
    print(f"stage logs: {', '.join(r['stage_log'] for r in results)}")
    print(f"curves:     tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
