"""Configuration of one LAG growth stage (the paper's section 4.1; one stage of adaptive stacking).

Every field has a default so that ``python -m lag_ds.stacking`` with no arguments runs the CPU demo;
``launch_scripts/ul2_grow.sh`` maps environment variables / flags onto these fields.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class LagRunConfig:
    out_dir: str = "runs/lag_demo"
    """Everything of this run: base/, base_universal/, candidates/<op>/{init,run}/, selection.json,
    promoted/{init,run}/, tb/ (all curves), journals."""
    train_config: str = "launch_scripts/configs/small_base.yaml"
    """Run config (``TrainConfig`` YAML) shared by base, candidates and the promoted run."""
    train_overrides: tuple[str, ...] = ()
    """``key=value`` overrides applied to every job (e.g. ``data.vocab_size=600``)."""
    base_checkpoint: str | None = None
    """DeepSpeed checkpoint dir (with ``latest``) of the pretrained L-layer model; None = pretrain
    one first (``base_steps`` steps on the whole allocation)."""
    base_steps: int | None = None
    """Steps of base pretraining when ``base_checkpoint`` is None (default: the train config's)."""
    grow_layers: int = 2
    """k in L -> L+k (the paper: 4, 12 -> 16)."""
    space: str = "starts0=0,2;blocks=1,2;inits=duplicate,random"
    """Design space (``lag_ds.growth.parse_space``): "paper", "all" or starts0=...;blocks=...;inits=..."""
    lag_steps: int = 40
    """k of LAG@k: steps each candidate trains before the decision (the paper's UL2 run: 2000)."""
    eval_interval: int = 10
    """Validation interval of candidates (curves in TensorBoard; LAG@k uses the point at base+k)."""
    smoothing_window: int = 1
    total_steps: int = 500
    """Absolute step the promoted winner trains to (the paper: 400k)."""
    allocation: str = "local:2"
    """``local:N`` (N slots here), ``hostfile:PATH`` (DeepSpeed hostfile), ``slurm``, or
    ``include:host:0,1@host2:0,1`` (DeepSpeed's include syntax, device ids kept: what
    ``deepspeed launch_scripts/ul2_grow.sh`` passes from the runner's resolved resources)."""
    slots_per_slice: int = 1
    """Slots per candidate job; candidates run concurrently on the slices, in waves if needed."""
    optimizer_state: str = "copy"
    seed: int = 0
    """Seed of random-init layers."""
    hang_timeout_s: float = 300.0
    max_retries: int = 0
    base_port: int = 29600

    def __post_init__(self) -> None:
        for name in ("grow_layers", "lag_steps", "eval_interval", "smoothing_window", "slots_per_slice", "total_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.optimizer_state not in ("copy", "zero"):
            raise ValueError(f"optimizer_state must be copy or zero, got {self.optimizer_state!r}")
