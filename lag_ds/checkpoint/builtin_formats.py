"""The formats lag_ds ships, registered with :mod:`lag_ds.checkpoint.formats` in sniff order.

Each entry is a sniff (file names only), a light ``info`` (layer count and step without reading
tensors: the trainer calls it at start-up), a grower and the options it honours. Adding a format is
one module with a reader and a grower, plus its layer table and one ``register`` call here.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

from lag_ds.checkpoint.formats import CheckpointInfo, Format, register
from lag_ds.checkpoint.layer_tables import family_of_layer_keys, megatron_core_table
from lag_ds.checkpoint.safe_load import load_checkpoint_file

UNIVERSAL_POINTER = "latest_universal"
_DS_OPTIONS = frozenset({"target_tp", "target_dp", "optimizer_state", "init_std", "unsafe_load"})


def _zero_stage(meta: dict) -> int:
    return int((meta.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))


# ---------------------------------------------------------------- DeepSpeed pipeline layer files
def _pipe_sniff(path: Path) -> bool:
    from lag_ds.checkpoint.deepspeed_pipe import resolve_pipe_dir

    tag_dir = resolve_pipe_dir(path)
    return tag_dir is not None and not (tag_dir / "zero" / "optimizer_state.pt").exists()


def _pipe_layer_count(tag_dir: Path, *, unsafe_load: bool) -> tuple[int, str]:
    from lag_ds.checkpoint.deepspeed_pipe import LAYER_FILE

    families = []
    for p in sorted(tag_dir.iterdir()):
        m = LAYER_FILE.match(p.name)
        if m and int(m.group(3) or 0) == 0:
            keys = load_checkpoint_file(p, unsafe=unsafe_load).keys()
            families.append(family_of_layer_keys(keys))
    found = {f for f in families if f}
    if len(found) != 1:
        raise ValueError(f"{tag_dir}: cannot tell the model family from its layer files")
    return sum(1 for f in families if f), found.pop()


def _pipe_info(path: Path, *, unsafe_load: bool = False) -> CheckpointInfo:
    from lag_ds.checkpoint.deepspeed_pipe import resolve_pipe_dir

    tag_dir = resolve_pipe_dir(path)
    num_layers, family = _pipe_layer_count(tag_dir, unsafe_load=unsafe_load)
    meta = load_checkpoint_file(tag_dir / "mp_rank_00_model_states.pt", unsafe=unsafe_load)
    return CheckpointInfo("deepspeed-pipe", tag_dir, num_layers, int(meta.get("global_steps", 0)),
                          family, _zero_stage(meta))


def _pipe_grow(src, dst, plan, *, show_progress=True, **options):
    from lag_ds.checkpoint.deepspeed_pipe_grow import grow_pipe_checkpoint

    return grow_pipe_checkpoint(src, dst, plan, show_progress=show_progress, **options)


def _pipe_open(path: Path, *, unsafe_load: bool = False):
    from lag_ds.checkpoint.deepspeed_pipe import PipeCheckpoint

    return PipeCheckpoint(path, unsafe_load=unsafe_load)


# ---------------------------------------------------------------- universal layout (lag_ds output)
def _universal_tag_dir(path: Path) -> Path | None:
    if not path.is_dir():
        return None
    if (path / "zero" / "optimizer_state.pt").is_file():
        return path
    pointer = path / UNIVERSAL_POINTER
    if pointer.is_file() and not (path / "latest").exists():
        tag = pointer.read_text(errors="replace").strip()
        if tag and "/" not in tag and (path / tag / "zero" / "optimizer_state.pt").is_file():
            return path / tag
        raise ValueError(f"{pointer}: names {tag[:40]!r}, which is not a complete universal checkpoint")
    return None


def _universal_info(path: Path, *, unsafe_load: bool = False) -> CheckpointInfo:
    from lag_ds.checkpoint.deepspeed_pipe import has_layer_files

    tag_dir = _universal_tag_dir(path)
    meta = load_checkpoint_file(tag_dir / "mp_rank_00_model_states.pt", unsafe=unsafe_load)
    if has_layer_files(tag_dir):
        num_layers, family = _pipe_layer_count(tag_dir, unsafe_load=unsafe_load)
    else:
        names = [p.name for p in (tag_dir / "zero").iterdir() if p.is_dir()]
        table = megatron_core_table(names)
        num_layers = len({s[0] for n in names if (s := table.split_layer_name(n))})
        family = table.family
    return CheckpointInfo("deepspeed-universal", tag_dir, num_layers,
                          int(meta.get("global_steps", 0)), family)


# ---------------------------------------------------------------- DeepSpeed ZeRO 0/1/2 (megatron-core)
def _zero_sniff(path: Path) -> bool:
    if not path.is_dir():
        return False
    if any(p.name.endswith("_model_states.pt") for p in path.iterdir()):
        return True
    latest = path / "latest"
    return latest.is_file() and (path / latest.read_text(errors="replace").strip()).is_dir()


def _zero_info(path: Path, *, unsafe_load: bool = False) -> CheckpointInfo:
    from lag_ds.checkpoint.deepspeed_source import resolve_tag_dir

    tag_dir = resolve_tag_dir(path)
    meta = load_checkpoint_file(tag_dir / "mp_rank_00_model_states.pt", unsafe=unsafe_load)
    module = meta.get("module") or {}
    table = megatron_core_table(module)
    num_layers = len({s[0] for n in module if (s := table.split_layer_name(n))})
    if num_layers == 0:
        raise ValueError(f"{tag_dir}: no decoder.layers.* parameters (not a megatron-core GPTModel?)")
    return CheckpointInfo("deepspeed", tag_dir, num_layers, int(meta.get("global_steps", 0)),
                          table.family, _zero_stage(meta))


def _zero_grow(src, dst, plan, *, show_progress=True, **options):
    from lag_ds.checkpoint.deepspeed_grow import grow_deepspeed_checkpoint

    return grow_deepspeed_checkpoint(src, dst, plan, show_progress=show_progress, **options)


class _ZeroReader:
    """:class:`~lag_ds.checkpoint.formats.CheckpointReader` view of a ``DeepSpeedCheckpoint``."""

    format, family = "deepspeed", "megatron-core-gpt"

    def __init__(self, ck) -> None:
        self.ck, self.num_layers, self.global_steps = ck, ck.num_layers, ck.global_steps

    def param_names(self) -> list[str]:
        return list(self.ck.param_names)

    def full_shape(self, name: str) -> tuple[int, ...]:
        return self.ck.full_shapes[name]

    def tp_rule(self, name: str):
        return self.ck.rules[name]

    def value(self, name: str, key: str = "fp32"):
        return self.ck.full_value(name, key)


def _zero_open(path: Path, *, unsafe_load: bool = False) -> _ZeroReader:
    from lag_ds.checkpoint.deepspeed_source import DeepSpeedCheckpoint

    return _ZeroReader(DeepSpeedCheckpoint(path, unsafe_load=unsafe_load))


# ---------------------------------------------------------------- Hugging Face safetensors
def _hf_sniff(path: Path) -> bool:
    from lag_ds.checkpoint.hf_safetensors import is_hf_checkpoint

    return is_hf_checkpoint(path)


def _hf_info(path: Path, *, unsafe_load: bool = False) -> CheckpointInfo:
    from lag_ds.checkpoint.hf_safetensors import _detect_arch

    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    _, arch = _detect_arch(config, config_path)
    return CheckpointInfo("hf-safetensors", path, int(config[arch.num_layers_key]), 0,
                          f"hf-{arch.family}")


def _hf_grow(src, dst, plan, *, show_progress=True):
    from lag_ds.checkpoint.hf_safetensors import grow_hf_checkpoint

    if plan is None:
        raise ValueError("--op is required for a Hugging Face checkpoint (there is nothing to reshard)")
    return grow_hf_checkpoint(Path(src), Path(dst), plan, show_progress=show_progress)


register(Format("hf-safetensors", _hf_sniff, _hf_info, _hf_grow, frozenset(),
                why_not="a Hugging Face directory holds unsharded weights and no optimizer state"))
register(Format("deepspeed-pipe", _pipe_sniff, _pipe_info, _pipe_grow,
                frozenset({"target_dp", "optimizer_state", "init_std", "unsafe_load", "target_tp"}),
                open=_pipe_open))
register(Format("deepspeed-universal", lambda p: _universal_tag_dir(p) is not None, _universal_info,
                None, frozenset(),
                why_not="grow the native checkpoint, or use materialise_candidate on a universal base"))
# ZeRO-3 (zero_pp_rank_*_model_states.pt) before ZeRO 0/1/2: their sniff matches *_model_states.pt.
_z3 = "lag_ds.checkpoint.deepspeed_zero3"
register(Format("deepspeed-zero3", lambda p: import_module(_z3).sniff(p),
                lambda p, **kw: import_module(_z3).info(p, **kw),
                lambda *a, **kw: import_module(_z3).grow_zero3_checkpoint(*a, **kw),
                frozenset({"target_dp", "optimizer_state", "init_std", "unsafe_load"}),
                why_not="ZeRO-3 output is TP=1 (universal layout, loads at any DP)",
                open=lambda p, **kw: import_module(_z3).open_reader(p, **kw)))
register(Format("deepspeed", _zero_sniff, _zero_info, _zero_grow, _DS_OPTIONS, open=_zero_open))


# ---------------------------------------------------------------- megatron-core torch_dist
def _torch_dist_info(path: Path, *, unsafe_load: bool = False) -> CheckpointInfo:
    from lag_ds.checkpoint.megatron_dist import TorchDistCheckpoint

    return TorchDistCheckpoint(path, unsafe_load=unsafe_load).info()


def _torch_dist_grow(src, dst, plan, *, show_progress=True, **options):
    from lag_ds.checkpoint.megatron_dist import grow_torch_dist_checkpoint

    return grow_torch_dist_checkpoint(src, dst, plan, show_progress=show_progress, **options)


def _torch_dist_open(path: Path, *, unsafe_load: bool = False):
    from lag_ds.checkpoint.megatron_dist import TorchDistCheckpoint

    return TorchDistCheckpoint(path, unsafe_load=unsafe_load)


def _torch_dist_sniff(path: Path) -> bool:
    from lag_ds.checkpoint.megatron_dist import is_torch_dist

    return is_torch_dist(path)


register(Format("megatron-torch-dist", _torch_dist_sniff, _torch_dist_info, _torch_dist_grow,
                frozenset({"optimizer_state", "init_std", "unsafe_load"}), open=_torch_dist_open,
                why_not="torch_dist stores global tensors: the output loads at any TP/DP as is"))
