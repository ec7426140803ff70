"""One growth stage as four steps, each returning a small result: prepare, race, decide, promote.

``ul2_grow.sh`` (:func:`lag_ds.stacking.lag_run.run_lag`) runs one stage after an optional base
run; adaptive stacking loops over stages with the same steps.  Every step is idempotent, so a
re-run of the same command after a crash or a SIGKILL resumes (RELIABILITY.md #8):

1. :func:`prepare`: the base resharded once into DeepSpeed's universal layout, then one grown
   checkpoint per operator of the design space, hard-linking every file it shares with the base
   (complete when its manifest exists);
2. :func:`race`: the candidates train on slices of the allocation until the race policy decides
   (:mod:`lag_ds.stacking.race`: LAG@k, successive halving, or "settle");
3. :func:`decide`: LAG@k over the candidates' curves (plus LAG@0), ``selection.json`` and its
   TensorBoard table;
4. :func:`promote`: the winner continues to ``total_steps`` from its own last checkpoint,
   resharded to the whole allocation; in *study* mode every candidate continues on its own slice
   instead (the paper's ground truth for the analysis), and the winner's study run is the promoted
   run (it is not trained twice).

Each training job gets a typed run-config file written from ``TrainConfig`` with
``dataclasses.replace`` (``<run_dir>/train_config.yaml``), so a renamed field fails here, at plan
time, not when a job starts.

The orchestrator knows models only through checkpoint functions and the trainer's config; the
launcher and the selector know nothing of models.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from lag_ds.atomic_io import atomic_write_text
from lag_ds.checkpoint.formats import read_checkpoint_info
from lag_ds.checkpoint.grow import grow_checkpoint  # any registered format (ZeRO 1/2/3)
from lag_ds.checkpoint.manifest import MANIFEST_NAME
from lag_ds.checkpoint.universal_links import disk_usage, materialise_candidate
from lag_ds.config import to_dict
from lag_ds.growth import GrowthOperator, parse_space, plan_growth
from lag_ds.launch import Allocation, JobSpec, ProgressReporter, run_jobs
from lag_ds.select import Selection, load_curve, select_lag, write_selection_json
from lag_ds.stacking.kill_point import kill_point
from lag_ds.stacking.race import RacePolicy, RaceResult, run_race
from lag_ds.train.config import TrainConfig
from lag_ds.train.metrics import STATUS_PREFIX

# Variables of the orchestrator's environment every job gets, on every host: the
# communication libraries' settings (e.g. GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME on a cluster)
# and the extension build cache.  DeepSpeed's pdsh runner forwards only NCCL*/PYTHON* by itself.
FORWARDED_ENV_PREFIXES = ("GLOO_", "NCCL_", "TORCH_EXTENSIONS_DIR", "TP_SOCKET_IFNAME")
JOB_CONFIG_NAME = "train_config.yaml"


@dataclass(frozen=True, kw_only=True)
class Launch:
    """Where and how the stage's jobs run (the launcher's knobs, nothing of models)."""

    allocation: Allocation
    slots_per_slice: int
    hang_timeout_s: float = 300.0
    max_retries: int = 0
    base_port: int = 29600
    poll_interval_s: float = 1.0
    launcher: str = "deepspeed"
    """``deepspeed`` (the runner; pdsh/ssh across hosts) or ``srun`` (SLURM job steps, no ssh:
    what an allocation read from SLURM uses; the orchestrator runs in the batch script)."""

    @staticmethod
    def launcher_for(allocation_spec: str) -> str:
        return "srun" if allocation_spec == "slurm" else "deepspeed"

    def run(self, jobs: list[JobSpec], *, journal: Path, whole: bool = False) -> dict:
        return run_jobs(jobs, journal_path=journal, **self.run_kw(whole=whole))

    def run_kw(self, *, whole: bool = False) -> dict[str, Any]:
        slots = self.allocation.num_slots if whole else self.slots_per_slice
        return dict(allocation=self.allocation, slots_per_slice=slots,
                    hang_timeout_s=self.hang_timeout_s, max_retries=self.max_retries,
                    poll_interval_s=self.poll_interval_s, progress=ProgressReporter(),
                    base_port=self.base_port, launcher=self.launcher)


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """What one stage does: grow ``base`` with every operator of ``space``, race, continue."""

    out_dir: Path
    """candidates/<op>/{init,run}, base_universal/, selection.json, promoted/, journals."""
    train: TrainConfig
    """Training settings shared by every job of the stage (run_dir etc. are set per job)."""
    base: Path
    """DeepSpeed checkpoint dir (ZeRO-1/2, with ``latest``) of the model to grow."""
    num_new_layers: int
    space: str
    """``lag_ds.growth.parse_space`` text: "paper", "all", or starts0=...;blocks=...;inits=...
    (ignored when ``operators`` is given)."""
    operators: tuple[GrowthOperator, ...] | None = None
    """The exact operators to race (a schedule's stage, or a fixed one), instead of ``space``."""
    policy: RacePolicy
    total_steps: int
    """Absolute step the promoted run (and, in study mode, every candidate) trains to."""
    eval_interval: int
    dense_eval_steps: int = 0
    """Validate every ``dense_eval_interval`` steps for this many steps after growing."""
    dense_eval_interval: int = 1
    smoothing_window: int = 1
    optimizer_state: str = "copy"
    seed: int = 0
    study: bool = False
    tb_dir: Path | None = None
    """One TensorBoard dir where every job of the stage writes its own run."""
    promoted_tb: tuple[Path, str] | None = None
    """(TensorBoard dir, run name) of the promoted run; default ``tb_dir``/promoted-<winner>.
    Adaptive stacking gives every stage's promoted run the same run, one curve across stages."""
    name: str = "stage"


@dataclass(frozen=True, kw_only=True)
class Prepared:
    base_step: int
    num_layers: int
    operators: tuple[GrowthOperator, ...]
    disk_usage: dict[str, int]

    @property
    def grown_layers(self) -> int:
        return self.num_layers + self.operators[0].num_new_layers


@dataclass(frozen=True, kw_only=True)
class Promoted:
    run_dir: Path
    final_step: int
    final_val_loss: float
    study_failed: dict[str, str]


def _complete(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def cand_dir(spec: StageSpec, name: str) -> Path:
    return spec.out_dir / "candidates" / name


def train_job(train: TrainConfig, name: str, run_dir: Path, *, total_steps: int,
              **fields: Any) -> JobSpec:
    """A trainer job whose settings are ``train`` with ``fields`` replaced, written to
    ``run_dir/train_config.yaml`` (a misspelt field is a TypeError here, before any job)."""
    cfg = dataclasses.replace(train, run_dir=str(run_dir.resolve()), train_steps=total_steps,
                              **fields)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / JOB_CONFIG_NAME
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return JobSpec(name=name, script="lag_ds.train", module=True,
                   args=["--config", str(path.resolve())], run_dir=run_dir, env=env,
                   total_steps=total_steps, status_prefix=STATUS_PREFIX)


def _tb(spec: StageSpec, run_name: str) -> dict[str, Any]:
    if spec.tb_dir is None:
        return {}
    return {"tb_dir": str(spec.tb_dir.resolve()), "tb_run_name": run_name}


# ---- 1. prepare ---------------------------------------------------------------------------------

def read_base(base: Path) -> tuple[int, int]:
    """(global step, number of layers) of a base checkpoint that a stage can grow, asked of the
    checkpoint formats' registry (no tensor is read)."""
    info = read_checkpoint_info(base)
    # megatron-core GPT or BERT (lag_ds.families): the readers tell them apart by their names
    if (info.format not in ("deepspeed", "deepspeed-zero3")
            or info.family not in ("megatron-core-gpt", "megatron-core-bert")):
        raise ValueError(f"{base}: a LAG stage grows lag_ds's own DeepSpeed checkpoints of a "
                         f"megatron-core GPT/BERT (found {info.format}, {info.family}); convert others "
                         "with tools/grow_checkpoint.py first")
    if info.zero_stage == 0:
        raise ValueError(f"{base}: LAG candidates need a ZeRO-1/2/3 base (universal layout); "
                         "this one is ZeRO-0")
    return info.step, info.num_layers


def prepare(spec: StageSpec) -> Prepared:
    """Base in universal layout once, then one hard-linked grown checkpoint per operator."""
    base_step, num_layers = read_base(spec.base)
    ops = spec.operators or tuple(parse_space(spec.space, num_layers=num_layers,
                                              num_new_layers=spec.num_new_layers))
    for op in ops:
        op.validate(num_layers)
    base_universal = spec.out_dir / "base_universal"
    if not _complete(base_universal):
        grow_checkpoint(spec.base, base_universal, None, show_progress=False)
    for op in ops:
        init = cand_dir(spec, op.name) / "init"
        if not _complete(init):
            init.parent.mkdir(parents=True, exist_ok=True)
            materialise_candidate(base_universal, init, plan_growth(op, num_layers, seed=spec.seed),
                                  optimizer_state=spec.optimizer_state)
        kill_point(f"candidate:{op.name}")
    usage = disk_usage([base_universal, *[cand_dir(spec, op.name) / "init" for op in ops]])
    return Prepared(base_step=base_step, num_layers=num_layers, operators=ops, disk_usage=usage)


# ---- 2. race ------------------------------------------------------------------------------------

def candidate_job(spec: StageSpec, prepared: Prepared, name: str, target: int) -> JobSpec:
    """Candidate ``name`` trained up to absolute step ``target`` (it resumes from its own
    checkpoint, or starts from its grown ``init``).

    Every job saves at its last step and, in the race as in a study run, on the train config's
    ``save_interval``: a node lost mid-race then costs a candidate the steps since its last
    interval, not all of them since growing (RELIABILITY.md #8).  ``keep_checkpoints=1`` keeps
    the disk cost at one checkpoint per candidate."""
    d = cand_dir(spec, name)
    dense = spec.dense_eval_steps
    return train_job(spec.train, name, d / "run", total_steps=target,
                     init_from=str((d / "init").resolve()), num_layers=prepared.grown_layers,
                     eval_interval=spec.eval_interval, save_interval=spec.train.save_interval,
                     keep_checkpoints=1, growth_step=prepared.base_step,
                     eval_dense_until=prepared.base_step + dense if dense else None,
                     eval_dense_interval=spec.dense_eval_interval, **_tb(spec, name))


def race(spec: StageSpec, prepared: Prepared, launch: Launch,
         say: Callable[[str], None] | None = None) -> RaceResult:
    names = [op.name for op in prepared.operators]
    return run_race(names, base_step=prepared.base_step, policy=spec.policy,
                    make_job=lambda n, t: candidate_job(spec, prepared, n, t),
                    journal_dir=spec.out_dir, run_kw=launch.run_kw(), say=say)


# ---- 3. decide ----------------------------------------------------------------------------------

def decide(spec: StageSpec, prepared: Prepared, result: RaceResult, *,
           extra: dict[str, Any] | None = None) -> Selection:
    """LAG@k (k = the race's decision step) among the candidates still in the race."""
    stopped = {n: f"{spec.policy.describe()} at step +{t}" for n, t in result.stopped.items()}
    selection = select_lag(result.curves, k=result.decision_k, base_step=prepared.base_step,
                           smoothing_window=spec.smoothing_window, failed=result.failed,
                           stopped=stopped)
    payload = {"operators": {op.name: asdict(op) for op in prepared.operators},
               "base_checkpoint": str(Path(spec.base).resolve()),
               "num_layers": {"base": prepared.num_layers, "grown": prepared.grown_layers},
               "disk_usage": prepared.disk_usage, "race": result.record,
               "candidate_steps": result.candidate_steps, "trained_to": result.trained_to,
               "study": spec.study, "stage": spec.name, **(extra or {})}
    write_selection_json(spec.out_dir / "selection.json", selection,
                         data_seed=spec.train.data_seed, extra=payload)
    if spec.tb_dir is not None:
        _selection_to_tensorboard(spec.tb_dir / "selection", selection, prepared.operators,
                                  step=prepared.base_step + result.decision_k,
                                  policy=spec.policy.describe())
    return selection


def _selection_to_tensorboard(tb_dir: Path, selection: Selection, ops, *, step: int,
                              policy: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    rows = ["| rank | candidate | LAG@k loss | LAG@0 loss |", "|---|---|---|---|"]
    rows += [f"| {r.rank} | {r.name} | {r.lag_k_loss:.4f} | {fmt(r.lag_0_loss)} |"
             for r in selection.ranking]
    rows += [f"| - | {n} | excluded: {why} | |" for n, why in selection.excluded.items()]
    by_name = {op.name: op for op in ops}
    with SummaryWriter(str(tb_dir)) as writer:
        writer.add_text("selection", f"winner **{selection.winner}** ({policy}, decided at "
                        f"LAG@{selection.k}); LAG@0 would pick {selection.lag0_winner}\n\n"
                        + "\n".join(rows), global_step=step)
        for r in selection.ranking:
            op = by_name[r.name]
            writer.add_hparams({"candidate": r.name, "start": op.start,
                                "block_size": op.block_size, "init": op.init},
                               {"hparam/lag_k_loss": r.lag_k_loss, "hparam/rank": r.rank},
                               run_name=r.name)


# ---- 4. promote ---------------------------------------------------------------------------------

def promote(spec: StageSpec, prepared: Prepared, result: RaceResult, selection: Selection,
            launch: Launch) -> Promoted:
    """Continue the winner to ``total_steps`` (study mode: every candidate, on its slice)."""
    winner = selection.winner
    if spec.study:
        names = [op.name for op in prepared.operators if op.name not in result.failed]
        jobs = [candidate_job(spec, prepared, n, spec.total_steps) for n in names]
        results = launch.run(jobs, journal=spec.out_dir / "journal-study.jsonl")
        study_failed = {n: r.reason for n, r in results.items() if r.state != "finished"}
        if winner in study_failed:
            raise RuntimeError(f"study run of the winner {winner} failed: "
                               f"{study_failed[winner]} (see {jobs[names.index(winner)].log_path})")
        run_dir = cand_dir(spec, winner) / "run"
    else:
        study_failed = {}
        winner_ckpt = cand_dir(spec, winner) / "run" / "checkpoints"
        promoted_init = spec.out_dir / "promoted" / "init"
        tp = spec.train.tensor_parallel
        if not _complete(promoted_init):
            promoted_init.parent.mkdir(parents=True, exist_ok=True)
            grow_checkpoint(winner_ckpt, promoted_init, None,
                            target_dp=launch.allocation.num_slots // tp, show_progress=False)
        kill_point("promoted_init")
        run_dir = spec.out_dir / "promoted" / "run"
        job = train_job(spec.train, "promoted", run_dir, total_steps=spec.total_steps,
                        init_from=str(promoted_init.resolve()), num_layers=prepared.grown_layers,
                        eval_interval=spec.eval_interval, growth_step=prepared.base_step,
                        **(_tb(spec, f"promoted-{winner}") if spec.promoted_tb is None else
                           {"tb_dir": str(spec.promoted_tb[0].resolve()),
                            "tb_run_name": spec.promoted_tb[1]}))
        r = launch.run([job], journal=spec.out_dir / "journal-promoted.jsonl", whole=True)
        if r["promoted"].state != "finished":
            raise RuntimeError(f"promoted run failed: {r['promoted'].reason} "
                               f"(see {job.log_path})")
    final = load_curve(run_dir / "metrics.jsonl", name=winner)
    return Promoted(run_dir=run_dir, final_step=int(final.steps[-1]),
                    final_val_loss=float(final.values[-1]), study_failed=study_failed)
