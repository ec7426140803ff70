"""Configuration of one training run (base pretraining, a LAG candidate, or the promoted winner).

Loaded strictly from YAML (unknown keys are errors) with ``--set a.b=value`` overrides; DeepSpeed's
own settings (ZeRO stage, precision, clipping) stay in the DeepSpeed JSON named by ``ds_config``.
Batch sizes live here and are written into the DeepSpeed config at start-up, so the two can never
disagree silently (a JSON that sets them differently is refused).

Example YAML::

    run_dir: runs/base
    preset: small
    train_steps: 300
    ds_config: ds_configs/cpu_zero2.json
    optim: {name: adamw, lr: 3.0e-3}
    schedule: {kind: cosine, warmup_steps: 30, decay_steps: 400, final_lr: 3.0e-4}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lag_ds.data import DataConfig


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: str = "adamw"
    """``adamw`` (paper's BERT runs) or ``adafactor`` (paper's UL2 run; ZeRO stage 0 + fp32 only,
    because ZeRO flattens parameters and Adafactor's factored second moment needs their shapes)."""
    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "adafactor"):
            raise ValueError(f"optim.name must be adamw or adafactor, got {self.name!r}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    kind: str = "constant"
    """``constant``: linear warm-up then constant (paper BERT). ``cosine``: linear warm-up then
    cosine decay reaching ``final_lr`` at ``decay_steps`` (paper UL2: 10k warm-up to 0.01, cosine
    so that step 400k would reach 0.001), constant at ``final_lr`` afterwards."""
    warmup_steps: int = 0
    decay_steps: int = 0
    final_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "cosine"):
            raise ValueError(f"schedule.kind must be constant or cosine, got {self.kind!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.kind == "cosine" and self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"schedule.decay_steps={self.decay_steps} must exceed warmup_steps={self.warmup_steps} for cosine"
            )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    run_dir: str = "runs/base"
    """Checkpoints go to ``run_dir/checkpoints``, TensorBoard events to ``tb_dir`` (default
    ``run_dir/tb``), scalars to ``run_dir/metrics.jsonl``."""
    family: str = "gpt-ul2"
    """Model family (:mod:`lag_ds.families`): ``gpt-ul2`` (GPTModel + UL2, the default) or
    ``bert-mlm`` (BertModel + masked LM, presets ``bert-*``)."""
    preset: str = "small"
    num_layers: int | None = None
    """Depth override of the preset (a grown candidate has more layers than its base)."""
    seed: int = 1234
    """Seed of the model's initial weights."""
    data: DataConfig = field(default_factory=DataConfig)
    data_seed: int = 1
    """Seed of the batch order: batch(step) is a pure function of (data_seed, step)."""
    global_batch_size: int = 16
    micro_batch_size: int = 8
    train_steps: int = 100
    """Absolute global step at which training stops (a resumed run continues up to it)."""
    eval_interval: int = 50
    """Validate when the global step is a multiple of this (and at the first and last step)."""
    eval_dense_until: int | None = None
    """Validate every ``eval_dense_interval`` steps up to this global step too: the paper reads
    candidates' curves step by step right after growing (LAG study runs set it to growth + E)."""
    eval_dense_interval: int = 1
    growth_step: int | None = None
    """Global step at which this model was grown (a LAG candidate or promoted run): validation
    is also logged to TensorBoard as ``val_since_growth/loss`` against steps since growing, so
    candidates' curves overlay from 0 instead of sitting at the end of the base run's axis."""
    eval_samples: int = 64
    log_interval: int = 1
    save_interval: int = 50
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (older ones are deleted only after a newer one is complete)."""
    init_from: str | None = None
    """Checkpoint directory (with a ``latest`` file) to start from when ``run_dir`` has none:
    model, optimizer and step are loaded (a grown candidate starts this way)."""
    tensor_parallel: int = 1
    ds_config: str = "ds_configs/cpu_zero2.json"
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    tb_dir: str | None = None
    tb_run_name: str | None = None
    """Sub-directory of ``tb_dir`` for this run (candidates share one ``tb_dir`` so curves overlay)."""
    cache_dir: str = ".cache/lag_ds"
    """Tokenizer and indexed-dataset cache (shared between runs)."""

    def __post_init__(self) -> None:
        from lag_ds.families import FAMILY_NAMES

        if self.family not in FAMILY_NAMES:
            raise ValueError(f"family must be one of {list(FAMILY_NAMES)}, got {self.family!r}")
        for name in ("global_batch_size", "micro_batch_size", "train_steps", "eval_interval",
                     "log_interval", "save_interval", "keep_checkpoints", "tensor_parallel", "eval_samples",
                     "eval_dense_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} not divisible by micro_batch_size={self.micro_batch_size}"
            )
