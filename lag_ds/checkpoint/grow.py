"""One entry point for growing a checkpoint directory, whatever its format.

Formats (one adapter each, all executing the same :class:`~lag_ds.growth.GrowthPlan`):

* Hugging Face safetensors (``config.json`` + ``*.safetensors``) → :mod:`.hf_safetensors`
* DeepSpeed ZeRO 0/1/2 x TP checkpoint of a megatron-core GPTModel → :mod:`.deepspeed_grow`
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lag_ds.growth import GrowthPlan


def detect_format(src: Path) -> str:
    from lag_ds.checkpoint.hf_safetensors import is_hf_checkpoint

    src = Path(src)
    if not src.exists():
        raise ValueError(f"--src {src}: no such file or directory")
    if is_hf_checkpoint(src):
        return "hf-safetensors"
    return "deepspeed"


def source_num_layers(src: Path, *, unsafe_load: bool = False) -> int:
    """Layer count read from the checkpoint itself (names and shapes / config.json)."""
    if detect_format(src) == "hf-safetensors":
        import json

        from lag_ds.checkpoint.hf_safetensors import _detect_arch

        config_path = Path(src) / "config.json"
        config = json.loads(config_path.read_text())
        _, arch = _detect_arch(config, config_path)
        return int(config[arch.num_layers_key])
    from lag_ds.checkpoint.deepspeed_source import DeepSpeedCheckpoint

    return DeepSpeedCheckpoint(src, unsafe_load=unsafe_load).num_layers


def grow_checkpoint(src: Path, dst: Path, plan: GrowthPlan | None, *, target_tp: int | None = None,
                    target_dp: int | None = None, optimizer_state: str = "copy", init_std: float = 0.02,
                    show_progress: bool = True, unsafe_load: bool = False) -> dict[str, Any]:
    fmt = detect_format(src)
    if fmt == "hf-safetensors":
        if plan is None:
            raise ValueError("--op is required for a Hugging Face checkpoint (there is nothing to reshard)")
        if target_tp or target_dp:
            raise ValueError("--target-tp/--target-dp apply to DeepSpeed checkpoints only")
        from lag_ds.checkpoint.hf_safetensors import grow_hf_checkpoint

        return grow_hf_checkpoint(Path(src), Path(dst), plan, show_progress=show_progress)
    from lag_ds.checkpoint.deepspeed_grow import grow_deepspeed_checkpoint

    return grow_deepspeed_checkpoint(Path(src), Path(dst), plan, target_tp=target_tp, target_dp=target_dp,
                                     optimizer_state=optimizer_state, init_std=init_std,
                                     show_progress=show_progress, unsafe_load=unsafe_load)
