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
    policy: str = "lag"
    """Race policy: ``lag`` (LAG@k), ``sh`` (successive halving up to k) or ``settle`` (stop when
    the candidates' ranking has settled, at most k); see ``lag_ds.stacking.race``."""
    sh_eta: int = 3
    """SH: keep the best ceil(n/eta) candidates at each rung."""
    sh_min_steps: int | None = None
    """SH: first rung r0 (rungs r0, eta*r0, ... < k, then k); default k // eta**2."""
    settle_tau: float = 0.9
    """settle: Spearman threshold between consecutive evaluations."""
    settle_m: int = 3
    """settle: consecutive pairs of evaluations that must reach tau."""
    settle_floor: int | None = None
    """settle: earliest step since growing it may stop at (default: one chunk)."""
    settle_chunk: int | None = None
    """settle: steps per round between checks (default k // 4); each round restarts the jobs."""
    study: bool = False
    """Study mode: after the decision every candidate continues to ``total_steps`` on its slice
    (ground truth for ``tools/analyze_lag.py``); the winner's study run is the promoted run."""
    dense_eval_steps: int = 0
    """Validate every ``dense_eval_interval`` steps for this many steps after growing (the paper
    reads the first 200 steps one by one); 0 = only every ``eval_interval``."""
    dense_eval_interval: int = 1

    def __post_init__(self) -> None:
        for name in ("grow_layers", "lag_steps", "eval_interval", "smoothing_window",
                     "slots_per_slice", "total_steps", "dense_eval_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dense_eval_steps < 0:
            raise ValueError(f"dense_eval_steps must be >= 0, got {self.dense_eval_steps}")
        if self.optimizer_state not in ("copy", "zero"):
            raise ValueError(f"optimizer_state must be copy or zero, got {self.optimizer_state!r}")
        self.race_policy()  # validates the policy's fields now, before any job

    def race_policy(self):
        from lag_ds.stacking.race import RacePolicy

        return RacePolicy(name=self.policy, k=self.lag_steps, eta=self.sh_eta,
                          min_steps=self.sh_min_steps, tau=self.settle_tau, m=self.settle_m,
                          floor=self.settle_floor, chunk=self.settle_chunk)
