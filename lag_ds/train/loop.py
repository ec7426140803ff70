"""The training loop: the family's batches -> DeepSpeed engine -> metrics, validation, checkpoints.

The model, its batches, loss and validation come from ``cfg.family`` (:mod:`lag_ds.families`:
GPT + UL2 by default, BERT + masked LM); everything below is family-agnostic.

One function, readable top to bottom (nanoGPT style). What makes it fit for LAG:

* batch(step) is a pure function of (data_seed, step), so every candidate sees the same data and a
  resumed run continues exactly where it stopped (a run of N steps equals N/2 + resume + N/2,
  bit for bit on CPU);
* a run starts from its own latest checkpoint if it has one, else from ``init_from`` (a grown
  candidate, or a winner's step-k checkpoint), else from scratch; it logs a validation point at
  its first step (LAG@0 for a candidate);
* a non-finite loss stops every rank *before* the optimizer step, logs it, and exits with code 3
  (the launcher marks the candidate failed).

Fault injection for tests: env ``LAG_DS_INJECT_NAN_AT_STEP=<step>`` makes the loss NaN at that step;
env ``LAG_DS_HOLD_AT=<step>:<file>`` makes every rank wait after that step (and its checkpoint)
while ``<file>`` exists, so that a test can kill the orchestrator, or the whole "node", at a known
point of a job that would otherwise be over in a fraction of a second.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from lag_ds import metrics_schema as ms
from lag_ds.config import to_dict
from lag_ds.data import prepare_data
from lag_ds.families import get_family
from lag_ds.train import checkpointing
from lag_ds.train.config import TrainConfig
from lag_ds.train.distributed import init_distributed
from lag_ds.train.engine import initialize_engine
from lag_ds.train.metrics import STATUS_PREFIX, MetricLogger
from lag_ds.train.startup import StartupClock

EXIT_NON_FINITE = 3
HOLD_ENV = "LAG_DS_HOLD_AT"


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"non-finite loss {value} at step {step}")
        self.step = step


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run (or resume) training up to ``cfg.train_steps``; returns the last validation scalars."""
    clock = StartupClock()
    clock.mark("imports")
    init_distributed(tensor_parallel=cfg.tensor_parallel)
    rank = dist.get_rank()
    clock.enabled = rank == 0
    clock.mark("distributed")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"

    say = _status(rank == 0)
    say(f"preparing data (corpus, tokenizer, indexed files) under {cfg.cache_dir}")
    t0 = time.perf_counter()
    data = prepare_data(cfg.data, Path(cfg.cache_dir))
    say(f"data ready in {time.perf_counter() - t0:.1f} s: {data.describe()}")
    family = get_family(cfg.family)  # model, objective and parameter names (lag_ds.families)
    tokenizer = family.tokenizer(data)
    clock.mark("data")
    model_cfg = family.get_preset(cfg.preset)
    if cfg.num_layers is not None:
        model_cfg = model_cfg.with_layers(cfg.num_layers)
    vocab = model_cfg.padded_vocab_size(tokenizer.vocab_size, ps.get_tensor_model_parallel_world_size())
    model = family.build_model(model_cfg, vocab_size=vocab, seed=cfg.seed)
    # Where to start: own checkpoint > init_from (native or universal) > scratch.
    own_tag = checkpointing.read_latest(ckpt_dir)
    resumed = own_tag is not None
    init_tag, universal = (None, False)
    if not resumed and cfg.init_from:
        init_tag, universal = checkpointing.read_init_pointer(Path(cfg.init_from))
        # DeepSpeed's universal loader silently skips parameters the model lacks: check depth first.
        found = checkpointing.checkpoint_num_layers(Path(cfg.init_from), init_tag, universal=universal)
        if found != model_cfg.num_layers:
            raise ValueError(f"init_from={cfg.init_from} has {found} layers but the run builds "
                             f"{model_cfg.num_layers} (set num_layers={found})")
    clock.mark("model")
    say(f"initialising DeepSpeed ({model_cfg.num_layers} layers)")
    engine, _, _, ds = initialize_engine(cfg, model, load_universal=universal)
    clock.mark("engine")
    if resumed:
        say(f"resuming from {ckpt_dir}/{own_tag}")
        client = checkpointing.load(engine, ckpt_dir, own_tag)
    elif init_tag is not None:
        say(f"loading {cfg.init_from}/{init_tag}{' (universal)' if universal else ''}")
        client = checkpointing.load(engine, Path(cfg.init_from), init_tag)
    else:
        client = {}
    clock.mark("checkpoint_load")
    if "data_seed" in client and client["data_seed"] != cfg.data_seed and resumed:
        raise ValueError(f"{ckpt_dir}: checkpoint was trained with data_seed={client['data_seed']}, config says {cfg.data_seed}")
    step = engine.global_steps
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    logger = MetricLogger(
        jsonl_path=run_dir / "metrics.jsonl",
        tb_dir=Path(cfg.tb_dir or run_dir / "tb") / (cfg.tb_run_name or ""),
        resume_step=step if (resumed or cfg.init_from) else None,
        enabled=rank == 0,
    )

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    grad_acc = cfg.global_batch_size // (cfg.micro_batch_size * dp_size)
    source = family.batch_source(data, tokenizer, seq_len=model_cfg.seq_length,
                                 global_batch_size=cfg.global_batch_size, seed=cfg.data_seed)
    val_batches = family.validation_batches(data, tokenizer, seq_len=model_cfg.seq_length,
                                            num_samples=cfg.eval_samples,
                                            batch_size=cfg.micro_batch_size, seed=cfg.data_seed)
    if rank == 0:
        # ZeRO-3 leaves empty placeholders in the module; ds_numel is the full size.
        n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        n *= ps.get_tensor_model_parallel_world_size()
        origin = "resumed" if resumed else "init_from" if cfg.init_from else "scratch"
        say(f"{model_cfg.num_layers} layers, ~{n:,} params, vocab {vocab}, DP={dp_size} "
            f"TP={ps.get_tensor_model_parallel_world_size()} "
            f"ZeRO={ds.get('zero_optimization', {}).get('stage', 0)}, start step {step} ({origin}), "
            f"training to step {cfg.train_steps}")
        logger.text("config", f"```\n{to_dict(cfg)}\n```", step)

    last_val: dict[str, float] = {}
    if not resumed:  # LAG@0: the loss right after growing (or at initialisation)
        say(f"validation at step {step} ({cfg.eval_samples} samples)")
        last_val = family.validation_loss(engine, val_batches, device)
        logger.log(step, last_val)
        _log_since_growth(logger, cfg, step, last_val)
    clock.mark("first_validation")
    clock.write(run_dir, final=False)

    inject = os.environ.get("LAG_DS_INJECT_NAN_AT_STEP")
    hold = _hold_request(os.environ.get(HOLD_ENV))
    progress = _progress_bar(rank == 0, initial=step, total=cfg.train_steps)
    tokens_per_step = cfg.global_batch_size * model_cfg.seq_length
    try:
        while step < cfg.train_steps:
            t0 = time.perf_counter()
            lr = engine.get_lr()[0]  # the rate this step's update uses
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for micro in range(grad_acc):
                batch = source.micro_batch(step, dp_rank=dp_rank, dp_size=dp_size,
                                           micro_batch_size=cfg.micro_batch_size, micro_index=micro)
                per_token = family.per_token_loss(engine, batch, device)
                mask = batch.loss_mask.to(device)
                loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)
                if inject is not None and int(inject) == step:
                    loss = loss * float("nan")
                loss_sum += loss.detach().double()
                if micro == grad_acc - 1:  # stop every rank before the optimizer step
                    check = loss_sum.clone()
                    dist.all_reduce(check)
                    if not torch.isfinite(check):
                        logger.log(step, {ms.TRAIN_LOSS: check.item()})
                        raise NonFiniteLoss(step, check.item())
                engine.backward(loss)
                engine.step()
            step = engine.global_steps
            dist.all_reduce(loss_sum, group=ps.get_data_parallel_group())
            train_loss = loss_sum.item() / (grad_acc * dp_size)
            if step % cfg.log_interval == 0 or step == cfg.train_steps:
                elapsed = time.perf_counter() - t0
                grad_norm = engine.get_global_grad_norm()
                logger.log(step, {
                    ms.TRAIN_LOSS: train_loss,
                    ms.TRAIN_LR: lr,
                    ms.TRAIN_GRAD_NORM: float(grad_norm) if grad_norm is not None else float("nan"),
                    ms.TRAIN_TOKENS_PER_S: tokens_per_step / elapsed,
                })
            if _evaluates(cfg, step):
                last_val = family.validation_loss(engine, val_batches, device)
                logger.log(step, last_val)
                _log_since_growth(logger, cfg, step, last_val)
            if step % cfg.save_interval == 0 or step == cfg.train_steps:
                checkpointing.save(engine, ckpt_dir, step=step, keep=cfg.keep_checkpoints,
                                   client_state={"data_seed": cfg.data_seed, "num_layers": model_cfg.num_layers,
                                                 "preset": cfg.preset, "family": cfg.family})
            if hold is not None and hold[0] == step:
                _hold(hold[1], step, say)
            progress.update(1)
            if not clock.written:
                clock.mark("first_step")
                clock.write(run_dir)
            progress.set_postfix(loss=f"{train_loss:.3f}", val=f"{last_val.get(ms.VAL_LOSS, math.nan):.3f}")
    finally:
        progress.close()
        logger.close()
    return last_val


def _hold_request(text: str | None) -> tuple[int, Path] | None:
    """``LAG_DS_HOLD_AT``'s (step, file); a malformed value is an error, not a silently
    ignored hook (a test relying on it would otherwise race a job that never waits)."""
    if not text:
        return None
    step, sep, path = text.partition(":")
    if not sep or not step.strip().isdigit() or not path:
        raise ValueError(f"{HOLD_ENV}={text!r}: expected <step>:<file>")
    return int(step), Path(path)


def _hold(path: Path, step: int, say) -> None:
    """Wait while ``path`` exists (test hook, see the module docstring); the status line tells
    the test that this job now sits after ``step`` with its checkpoint written."""
    if path.exists():
        say(f"held after step {step} while {path} exists")
    while path.exists():
        time.sleep(0.05)


def _evaluates(cfg: TrainConfig, step: int) -> bool:
    """Validation cadence: every ``eval_interval``, densely up to ``eval_dense_until``, and last."""
    if step % cfg.eval_interval == 0 or step == cfg.train_steps:
        return True
    return cfg.eval_dense_until is not None and step <= cfg.eval_dense_until \
        and step % cfg.eval_dense_interval == 0


def _log_since_growth(logger: MetricLogger, cfg: TrainConfig, step: int,
                      scalars: dict[str, float]) -> None:
    if cfg.growth_step is not None and step >= cfg.growth_step:
        logger.tb_scalar(ms.VAL_SINCE_GROWTH, scalars[ms.VAL_LOSS], step - cfg.growth_step)


def _status(enabled: bool):
    def say(message: str) -> None:
        if enabled:
            print(f"{STATUS_PREFIX} {message}", flush=True)
    return say


def _progress_bar(enabled: bool, *, initial: int, total: int):
    from tqdm import tqdm

    return tqdm(initial=initial, total=total, disable=not enabled, unit="step", dynamic_ncols=True)
