"""Read a DeepSpeed checkpoint of a megatron-core GPTModel parameter by parameter, shard by shard.

Supported: ZeRO stage 0 (optimizer state inside ``mp_rank_XX_model_states.pt``: fp32 runs keep the
torch optimizer's ``state`` / ``param_groups``; bf16 runs keep DeepSpeed's mixed-precision wrapper
state -- fp32 master copies in ``fp32_groups``, moments in ``optimizer_state_dict``, loss-scale
fields beside them) and ZeRO
stages 1/2 (``zero_pp_rank_<dp>_mp_rank_<tp>_optim_states.pt``: a flat fp32 partition per param
group, Adam moments of the same shape, ``param_slice_mappings`` saying where each parameter's
fragment lies), any TP x DP. ZeRO-3 is refused; pipeline layer files are read by
:mod:`lag_ds.checkpoint.deepspeed_pipe` (the registry in :mod:`.formats` picks the reader).

Why it streams: every file is opened with ``mmap=True``; :meth:`full_param` gathers one parameter's
fragments from the DP partitions of each TP rank and merges the TP shards, so peak memory is a few
copies of the largest parameter, never the optimizer state of the whole model.

The topology is validated before anything is read for real (RELIABILITY.md #4): file count =
TP x DP, no missing rank file, same ZeRO stage and step in every partition, every element of every
parameter covered by exactly its fragments, shapes consistent across TP ranks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from lag_ds.checkpoint.gather import gather_full, willneed
from lag_ds.checkpoint.layer_tables import megatron_core_table
from lag_ds.checkpoint.megatron_layout import (
    TpRule,
    detect_glu,
    merge_tp,
    tp_rule,
)
from lag_ds.checkpoint.safe_load import load_checkpoint_file

MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
STATE_KEYS = ("exp_avg", "exp_avg_sq")


def resolve_tag_dir(src: Path) -> Path:
    """``src`` may be a run's checkpoint directory (with ``latest``) or a tag directory."""
    src = Path(src)
    if not src.exists():
        raise ValueError(f"--src {src}: no such directory")
    if any(MODEL_FILE.match(p.name) for p in src.iterdir()):
        return src
    latest = src / "latest"
    if not latest.is_file():
        raise ValueError(f"--src {src}: neither a tag directory (mp_rank_*_model_states.pt) nor has a 'latest' file")
    tag = latest.read_text(errors="replace").strip()
    if not tag or "/" in tag or not (src / tag).is_dir():
        raise ValueError(f"{latest}: names {tag[:40]!r}, which is not a directory next to it")
    return src / tag


@dataclass(frozen=True)
class Fragment:
    dp_rank: int
    group: int
    start: int
    numel: int


class DeepSpeedCheckpoint:
    """A validated, lazily read DeepSpeed checkpoint (one tag directory)."""

    def __init__(self, src: Path, *, unsafe_load: bool = False) -> None:
        self.tag_dir = resolve_tag_dir(src)
        self.tag = self.tag_dir.name
        self.unsafe = unsafe_load
        files = sorted(p.name for p in self.tag_dir.iterdir())
        model_ranks = sorted(int(m.group(1)) for f in files if (m := MODEL_FILE.match(f)))
        self.tp = len(model_ranks)
        if self.tp == 0:
            raise ValueError(f"{self.tag_dir}: no mp_rank_XX_model_states.pt (deleted shard?)")
        if model_ranks != list(range(self.tp)):
            raise ValueError(f"{self.tag_dir}: model state files for TP ranks {model_ranks} are not 0..{self.tp - 1}")
        if any(f.startswith("layer_") for f in files):
            raise ValueError(f"{self.tag_dir}: pipeline layer files (layer_*.pt): open it with "
                             "lag_ds.checkpoint.formats.open_checkpoint (deepspeed-pipe)")
        self.model_states = [load_checkpoint_file(self.tag_dir / f"mp_rank_{r:02d}_model_states.pt",
                                                  unsafe=unsafe_load) for r in range(self.tp)]
        meta = self.model_states[0]
        self.zero_stage = int(meta.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
        if meta.get("mp_world_size", self.tp) != self.tp:
            raise ValueError(f"{self.tag_dir}: {self.tp} model state files but the checkpoint says mp_world_size={meta['mp_world_size']} (missing rank file?)")
        if self.zero_stage >= 3:
            raise ValueError(f"{self.tag_dir}: ZeRO stage {self.zero_stage} is not supported (stages 0, 1, 2)")
        self.dp = int(meta.get("dp_world_size", 1))
        optim = [(m.group(1), int(m.group(2)), int(m.group(3))) for f in files if (m := OPTIM_FILE.match(f))]
        if self.zero_stage == 0:
            if optim:
                raise ValueError(f"{self.tag_dir}: ZeRO stage 0 with {'bf16 ' if optim[0][0] else ''}optimizer partition files is not supported (fp32 stage 0 only)")
            self.optim_states: list[list[Any]] = []
        else:
            found = {(d, t) for _, d, t in optim}
            expected = {(d, t) for d in range(self.dp) for t in range(self.tp)}
            if found != expected:
                missing = sorted(expected - found)
                extra = sorted(found - expected)
                raise ValueError(f"{self.tag_dir}: ZeRO files do not match TP={self.tp} x DP={self.dp}: "
                                 f"missing (dp,tp) {missing[:4]}{' ...' if len(missing) > 4 else ''} extra {extra[:4]}")
            prefix = optim[0][0] or ""
            self.optim_states = [[load_checkpoint_file(
                self.tag_dir / f"{prefix}zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt", unsafe=unsafe_load
            )["optimizer_state_dict"] for d in range(self.dp)] for t in range(self.tp)]
        self._index()
        self._check_step_agrees()

    def _check_step_agrees(self) -> None:
        """The optimizer partitions' Adam step must be the model states' step: with DP=TP=1 a
        partition file copied from another save has nothing else to disagree with."""
        if self.zero_stage == 0 or getattr(self, "_step", None) is None:
            return
        meta = self.model_states[0]
        if "global_steps" not in meta:
            return
        done = int(meta["global_steps"]) - int(meta.get("skipped_steps", 0) or 0)
        if int(self._step) != done:
            raise ValueError(f"{self.tag_dir}: optimizer partitions are at step {int(self._step)} "
                             f"but mp_rank_00_model_states.pt at step {done} (a shard from another "
                             "step or run?)")

    def _optimizer(self, rank: int = 0) -> dict[str, Any]:
        """ZeRO-0: the torch optimizer state dict (inside the bf16 wrapper's, when there is one)."""
        opt = self.model_states[rank].get("optimizer") or {}
        return opt.get("optimizer_state_dict", opt)

    @property
    def mixed_precision_stage0(self) -> bool:
        """ZeRO-0 with bf16/fp16: fp32 masters live in ``optimizer['fp32_groups']``."""
        return self.zero_stage == 0 and "fp32_groups" in (self.model_states[0].get("optimizer") or {})

    # ----------------------------------------------------------------- structure
    def _index(self) -> None:
        module0 = self.model_states[0]["module"]
        names = [k for k, v in module0.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")]
        self.extra_state_keys = [k for k in module0 if k.endswith("_extra_state")]
        self.local_shapes: list[dict[str, tuple[int, ...]]] = []
        for r, states in enumerate(self.model_states):
            module = states["module"]
            missing = [n for n in names if n not in module]
            if missing:
                raise ValueError(f"{self.tag_dir}/mp_rank_{r:02d}_model_states.pt: lacks {missing[0]} (TP ranks disagree)")
            self.local_shapes.append({n: tuple(module[n].shape) for n in names})
        self.glu = detect_glu(self.local_shapes[0])
        self.rules: dict[str, TpRule] = {n: tp_rule(n, glu=self.glu) for n in names}
        if self.zero_stage == 0:
            self.param_names = self._stage0_param_names(names)
        else:
            self.param_names = self._zero_param_names()
        self.full_shapes = {n: self._full_shape(n) for n in self.param_names}
        # GPTModel (decoder.layers) or BertModel (encoder.layers): the names say which
        self.layer_table = megatron_core_table(self.param_names)
        split_layer_name = self.layer_table.split_layer_name
        layers = sorted({s[0] for n in self.param_names if (s := split_layer_name(n))})
        if layers != list(range(len(layers))):
            raise ValueError(f"{self.tag_dir}: layer indices {layers} are not contiguous from 0")
        self.num_layers = len(layers)
        if self.num_layers == 0:
            raise ValueError(f"{self.tag_dir}: no decoder.layers.* parameters (not a megatron-core GPTModel?)"
                             if self.layer_table.family == "megatron-core-gpt" else
                             f"{self.tag_dir}: no encoder.layers.* parameters")

    def _stage0_param_names(self, names: list[str]) -> list[str]:
        groups = self._optimizer().get("param_groups")
        if not groups:
            raise ValueError(f"{self.tag_dir}: ZeRO-0 checkpoint without optimizer state")
        count = sum(len(g["params"]) for g in groups)
        if count != len(names):
            raise ValueError(f"{self.tag_dir}: optimizer has {count} parameters, module has {len(names)}")
        return names

    def _zero_param_names(self) -> list[str]:
        """Parameter order and fragment map from ``param_slice_mappings``; checks full coverage."""
        self.fragments: list[dict[str, list[Fragment]]] = []
        order: list[str] | None = None
        step = None
        for t in range(self.tp):
            frags: dict[str, list[Fragment]] = {}
            names_t: list[str] = []
            for d, osd in enumerate(self.optim_states[t]):
                stage = int(getattr(osd.get("zero_stage"), "value", osd.get("zero_stage", -1)))
                if stage != self.zero_stage:
                    raise ValueError(f"{self.tag_dir}: partition dp={d} tp={t} says ZeRO stage {stage}, model states say {self.zero_stage}")
                for g, mapping in enumerate(osd["param_slice_mappings"]):
                    state = osd["base_optimizer_state"]["state"][g]
                    part_numel = osd["single_partition_of_fp32_groups"][g].numel()
                    for key in STATE_KEYS:
                        if state[key].numel() != part_numel:
                            raise ValueError(f"{self.tag_dir}: dp={d} tp={t} group {g}: {key} size differs from fp32 partition")
                    s = float(state["step"])
                    if step is None:
                        step = s
                    elif s != step:
                        raise ValueError(f"{self.tag_dir}: optimizer step differs between partitions ({s} vs {step})")
                    for name, addr in mapping.items():
                        if addr.start + addr.numel > part_numel:
                            raise ValueError(f"{self.tag_dir}: fragment of {name} runs past partition dp={d} tp={t}")
                        if name not in frags:
                            names_t.append(name)
                        frags.setdefault(name, []).append(Fragment(d, g, int(addr.start), int(addr.numel)))
            for name in names_t:
                shape = self.local_shapes[t].get(name)
                if shape is None:
                    raise ValueError(f"{self.tag_dir}: optimizer holds {name}, which the module "
                                     "does not have (a shard from another run?)")
                covered = sum(f.numel for f in frags[name])
                if covered != math.prod(shape):
                    raise ValueError(f"{self.tag_dir}: tp={t} {name}: fragments cover {covered} of {math.prod(shape)} elements")
            if order is None:
                order = names_t
            elif names_t != order:
                raise ValueError(f"{self.tag_dir}: TP ranks hold different parameter lists")
            self.fragments.append(frags)
        assert order is not None
        missing = [n for n in self.local_shapes[0] if n not in order]
        if missing:
            raise ValueError(f"{self.tag_dir}: module parameter {missing[0]} has no optimizer "
                             "state (a shard from another run?)")
        self._step = step
        return order

    def _full_shape(self, name: str) -> tuple[int, ...]:
        shapes = [s[name] for s in self.local_shapes]
        rule = self.rules[name]
        if rule.cat_dim is None:
            if len(set(shapes)) != 1:
                raise ValueError(f"{self.tag_dir}: replicated {name} has different shapes across TP ranks: {shapes}")
            return shapes[0]
        full = list(shapes[0])
        full[rule.cat_dim] = sum(s[rule.cat_dim] for s in shapes)
        return tuple(full)

    # ----------------------------------------------------------------- metadata
    @cached_property
    def step(self) -> float:
        if self.zero_stage == 0:
            states = self._optimizer()["state"]
            steps = {float(s["step"]) for s in states.values()}
            if len(steps) > 1:
                raise ValueError(f"{self.tag_dir}: optimizer step differs between parameters: {sorted(steps)}")
            return steps.pop() if steps else 0.0
        return float(self._step)

    @property
    def global_steps(self) -> int:
        return int(self.model_states[0].get("global_steps", 0))

    def param_groups(self) -> list[dict[str, Any]]:
        if self.zero_stage == 0:
            return self._optimizer()["param_groups"]
        return self.optim_states[0][0]["base_optimizer_state"]["param_groups"]

    def optimizer_globals(self) -> dict[str, Any]:
        """ZeRO optimizer state without tensors/partition maps (what universal loading reads)."""
        osd = self.optim_states[0][0]
        drop = {"base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings"}
        return {k: v for k, v in osd.items() if k not in drop}

    # ----------------------------------------------------------------- tensors
    def local_value(self, name: str, tp_rank: int, key: str = "fp32") -> torch.Tensor:
        """This TP rank's shard of a parameter (``fp32``) or of an Adam moment, as fp32."""
        shape = self.local_shapes[tp_rank][name]
        if self.zero_stage == 0:
            states = self.model_states[tp_rank]
            index = self.param_names.index(name)
            if key == "fp32" and self.mixed_precision_stage0:
                flat = [t for group in states["optimizer"]["fp32_groups"] for t in group]
                return flat[index].float().reshape(shape)
            if key == "fp32":
                return states["module"][name].float().reshape(shape)
            return self._optimizer(tp_rank)["state"][index][key].float().reshape(shape)
        pieces = list(self._pieces(name, tp_rank, key))
        # Always a copy: a view would keep the whole memory-mapped partition as its storage, and
        # torch.save writes a tensor's entire storage.
        joined = pieces[0].clone() if len(pieces) == 1 else torch.cat(pieces)
        return joined.float().reshape(shape)

    def _pieces(self, name: str, tp_rank: int, key: str) -> Iterator[torch.Tensor]:
        """This TP rank's fragments of ``name``, in order: views into the mapped partitions."""
        for frag in self.fragments[tp_rank][name]:
            osd = self.optim_states[tp_rank][frag.dp_rank]
            flat = (osd["single_partition_of_fp32_groups"][frag.group] if key == "fp32"
                    else osd["base_optimizer_state"]["state"][frag.group][key])
            yield flat.narrow(0, frag.start, frag.numel)

    def full_value(self, name: str, key: str = "fp32", *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The TP-merged parameter or moment, gathered in one copy into one new fp32 tensor, or
        into ``out`` (``gather.py``: one parameter in memory at a time, no intermediate shards)."""
        if self.zero_stage == 0:
            shards = [self.local_value(name, r, key) for r in range(self.tp)]
            merged = merge_tp(shards, self.rules[name])
            return merged if out is None else out.view(merged.shape).copy_(merged)
        return gather_full(self.full_shapes[name], self.rules[name],
                           [s[name] for s in self.local_shapes],
                           lambda r: self._pieces(name, r, key), what=f"{self.tag_dir}: {name}",
                           out=out)

    def prefetch(self, name: str, key: str = "fp32") -> None:
        """Start reading what :meth:`full_value` will read for ``name`` (``gather.willneed``)."""
        if self.zero_stage > 0:
            willneed(piece for r in range(self.tp) for piece in self._pieces(name, r, key))

    def client_state(self) -> dict[str, Any]:
        """Model-state keys that are neither DeepSpeed's own nor the module (the trainer's extras)."""
        own = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
               "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
               "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
               "ds_version", "checkpoint_parallel_dimensions", "universal_checkpoint_info"}
        return {k: v for k, v in self.model_states[0].items() if k not in own}

    def files(self) -> list[Path]:
        return sorted(p for p in self.tag_dir.iterdir() if p.is_file())
