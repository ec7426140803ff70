"""DeepSpeed engine construction: our model + optimizer + schedule + the user's DeepSpeed JSON.

The DeepSpeed JSON owns what DeepSpeed owns (ZeRO stage, precision, gradient clipping); the run
config owns batch sizes and the optimizer, which we build ourselves (``torch.optim.AdamW`` is on
DeepSpeed's ZeRO-supported list; Adafactor from ``transformers``) so CPU and GPU runs use the same
update rule. Combinations that would silently do something else are refused here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state as ps

from lag_ds.model.mpu import MegatronMpu
from lag_ds.train.config import TrainConfig
from lag_ds.train.schedules import lambda_scheduler


def load_ds_config(cfg: TrainConfig, *, load_universal: bool = False) -> dict[str, Any]:
    """Read the DeepSpeed JSON and fill in batch sizes from the run config (refusing conflicts)."""
    path = Path(cfg.ds_config)
    if not path.is_file():
        raise ValueError(f"ds_config not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    dp = ps.get_data_parallel_world_size()
    per_step = cfg.micro_batch_size * dp
    if cfg.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size={cfg.global_batch_size} not divisible by micro_batch_size x DP = "
            f"{cfg.micro_batch_size} x {dp}"
        )
    wanted = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.global_batch_size // per_step,
    }
    for key, value in wanted.items():
        if key in ds and ds[key] != value:
            raise ValueError(f"{path}: {key}={ds[key]} conflicts with the run config ({value}); remove it from the JSON")
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError(f"{path}: set the optimizer and schedule in the run config, not in the DeepSpeed JSON")
    ds = copy.deepcopy(ds)
    ds.update(wanted)
    ds.setdefault("checkpoint", {})["use_node_local_storage"] = False
    if load_universal:
        if zero_stage(ds) == 0:
            raise ValueError(f"{path}: a universal checkpoint (from ZeRO-1/2/3) needs ZeRO "
                             "stage 1, 2 or 3 to load")
        ds["checkpoint"]["load_universal"] = True
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def uses_bf16(ds: dict[str, Any]) -> bool:
    return bool(ds.get("bf16", {}).get("enabled", False))


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, ds: dict[str, Any]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adafactor":
        if zero_stage(ds) > 0 or uses_bf16(ds) or ds.get("fp16", {}).get("enabled", False):
            raise ValueError(
                f"{cfg.ds_config}: Adafactor needs ZeRO stage 0 in fp32 — ZeRO and the bf16 optimizer "
                "flatten parameters, which destroys the row/column factoring of its second moment"
            )
        from transformers.optimization import Adafactor

        return Adafactor(model.parameters(), lr=o.lr, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=o.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay)


def initialize_engine(cfg: TrainConfig, model: torch.nn.Module, *, load_universal: bool = False):
    """Returns (engine, optimizer, lr_scheduler, ds_config)."""
    import deepspeed

    ds = load_ds_config(cfg, load_universal=load_universal)
    optimizer = build_optimizer(cfg, model, ds)
    scheduler = lambda_scheduler(optimizer, cfg.schedule, peak_lr=cfg.optim.lr)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds, mpu=MegatronMpu(),
    )
    return engine, optimizer, scheduler, ds
