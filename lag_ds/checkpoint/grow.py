"""One entry point for growing a checkpoint directory, whatever its format.

The format is sniffed through the registry (:mod:`lag_ds.checkpoint.formats`; built-in layouts in
:mod:`lag_ds.checkpoint.builtin_formats`): Hugging Face safetensors, DeepSpeed pipeline layer
files, DeepSpeed ZeRO 0/1/2 x TP and ZeRO-3 (TP=1) of a megatron-core GPTModel. Every grower
executes the same :class:`~lag_ds.growth.GrowthPlan` through :mod:`lag_ds.checkpoint.recipes`.
Options the format cannot honour are errors naming the option, never dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lag_ds.checkpoint.formats import check_options, detect_format, read_checkpoint_info
from lag_ds.growth import GrowthPlan


def source_num_layers(src: Path, *, unsafe_load: bool = False) -> int:
    """Layer count read from the checkpoint itself (names and shapes / config.json)."""
    return read_checkpoint_info(Path(src), unsafe_load=unsafe_load).num_layers


def grow_checkpoint(src: Path, dst: Path, plan: GrowthPlan | None, *, target_tp: int | None = None,
                    target_dp: int | None = None, optimizer_state: str | None = None,
                    init_std: float | None = None, show_progress: bool = True,
                    unsafe_load: bool = False) -> dict[str, Any]:
    """Grow (``plan``) and/or reshard ``src`` into the new directory ``dst``; returns the manifest.

    ``None`` / ``False`` means "not given": the format's default applies; a given option the
    format cannot honour raises ``ValueError`` naming it."""
    fmt = detect_format(Path(src))
    if fmt.grow is None:
        raise ValueError(f"--src {src}: growing {fmt.name} checkpoints is not supported ({fmt.why_not})")
    options = check_options(fmt, {"target_tp": target_tp, "target_dp": target_dp,
                                  "optimizer_state": optimizer_state, "init_std": init_std,
                                  "unsafe_load": unsafe_load})
    return fmt.grow(Path(src), Path(dst), plan, show_progress=show_progress, **options)
