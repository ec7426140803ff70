"""Read and grow DeepSpeed ZeRO-3 checkpoints of a megatron-core GPTModel, with optimizer state.

ZeRO-3 layout (one tag directory, DP ranks ``d``, TP rank 0)::

    zero_pp_rank_<d>_mp_rank_00_model_states.pt   metadata; ``param_shapes`` = per sub-group
                                                  {name: full shape}, in the order of the flat data
    [bf16_]zero_pp_rank_<d>_mp_rank_00_optim_states.pt
        optimizer_state_dict.fp32_flat_groups[g]  rank d's flat fp32 partition of sub-group g
        optimizer_state_dict.optimizer_state_dict.state[g].{exp_avg, exp_avg_sq, step}

Why it is parsed this way: ZeRO-3 partitions *every parameter* over the DP ranks. Rank ``d`` holds
elements ``[d * c, (d + 1) * c)`` of each flattened parameter, ``c = ceil(numel / DP)`` (the last
rank zero-padded), and a sub-group's flat partition is these per-parameter slices back to back in
``param_shapes`` order. :meth:`Zero3Checkpoint.full_value` therefore gathers one parameter from
every rank's file (memory-mapped) and cuts the padding off: peak memory is about one parameter,
never the model.

Output (:func:`grow_zero3_checkpoint`): DeepSpeed's universal layout, as for ZeRO-1/2 sources,
because stock DeepSpeed 0.19's ZeRO-3 loads it (its
``load_hp_checkpoint_state_from_checkpoint_dir_stage3`` re-partitions each full tensor for the
loading DP degree) -- verified by the tests at the same and at another DP degree. Stage 3 looks
for ``zero_pp_rank_0_mp_rank_XX_model_states.pt`` and reads the step from
``optimizer_state.pt['optimizer_state_dict']['state'][0]``; stage 1/2 look for
``mp_rank_XX_model_states.pt`` and the top-level keys. Both are written (stage 3 is what is tested).

Limits (refused with one line, never guessed): TP > 1 (the stage-3 universal loader partitions the
full tensor over DP without a TP split for megatron-core's own TP layers), frozen parameters,
more than one optimizer param group.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lag_ds.checkpoint.gather import gather_full, willneed
from lag_ds.checkpoint.megatron_layout import TpRule, detect_glu, split_layer_name, tp_rule
from lag_ds.checkpoint.safe_load import load_checkpoint_file

MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
STATE_KEYS = ("exp_avg", "exp_avg_sq")
UNIVERSAL_POINTER = "latest_universal"


def zero3_tag_dir(path: Path) -> Path | None:
    """The ZeRO-3 tag directory ``path`` names (itself or via ``latest``), else None (cheap)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if any(MODEL_FILE.match(p.name) for p in path.iterdir()):
        return path
    latest = path / "latest"
    if latest.is_file():
        # A sniffer never raises: a garbage pointer is the DeepSpeed reader's error to report.
        tag = latest.read_bytes().decode("utf-8", "replace").strip()
        if tag and "/" not in tag and "\x00" not in tag and (path / tag).is_dir():
            if any(MODEL_FILE.match(p.name) for p in (path / tag).iterdir()):
                return path / tag
    return None


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives in every rank's flat partitions."""

    group: int
    offset: int  # within the sub-group's flat partition
    chunk: int  # elements per rank: ceil(numel / DP)
    shape: tuple[int, ...]


class Zero3Checkpoint:
    """A validated, lazily read ZeRO-3 checkpoint (one tag directory)."""

    format, family = "deepspeed-zero3", "megatron-core-gpt"

    def __init__(self, src: Path, *, unsafe_load: bool = False) -> None:
        tag_dir = zero3_tag_dir(src)
        if tag_dir is None:
            raise ValueError(f"--src {src}: no zero_pp_rank_*_mp_rank_*_model_states.pt "
                             "(not ZeRO-3)")
        self.tag_dir, self.tag = tag_dir, tag_dir.name
        files = sorted(p.name for p in tag_dir.iterdir())
        models = sorted((int(m.group(1)), int(m.group(2)))
                        for f in files if (m := MODEL_FILE.match(f)))
        if any(t != 0 for _, t in models):
            raise ValueError(f"{tag_dir}: ZeRO-3 with tensor parallelism (mp_rank > 0) is not "
                             "supported (TP=1 only)")
        meta = load_checkpoint_file(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                                    unsafe=unsafe_load)
        self.meta = meta
        self.zero_stage = int((meta.get("ds_config") or {}).get("zero_optimization", {})
                              .get("stage", 0))
        if self.zero_stage != 3:
            raise ValueError(f"{tag_dir}: model states say ZeRO stage {self.zero_stage}, "
                             "file names say 3")
        self.tp, self.dp = 1, int(meta.get("dp_world_size", 1))
        if int(meta.get("mp_world_size", 1)) != 1:
            raise ValueError(f"{tag_dir}: mp_world_size={meta['mp_world_size']}: ZeRO-3 with "
                             "tensor parallelism is not supported (TP=1 only)")
        expected = list(range(self.dp))
        if [d for d, _ in models] != expected:
            raise ValueError(f"{tag_dir}: model state files for DP ranks {[d for d, _ in models]}, "
                             f"checkpoint says dp_world_size={self.dp} (missing rank file?)")
        optim = sorted((int(m.group(2)), m.group(1) or "") for f in files
                       if (m := OPTIM_FILE.match(f)) and m.group(3) == "00")
        missing = sorted(set(expected) - {d for d, _ in optim})
        if missing or len(optim) != self.dp:
            raise ValueError(f"{tag_dir}: ZeRO-3 optimizer files do not match DP={self.dp}: "
                             f"missing dp rank(s) {missing[:4]}")
        prefix = optim[0][1]
        self.optim_states = []
        for d in expected:
            name = f"{prefix}zero_pp_rank_{d}_mp_rank_00_optim_states.pt"
            osd = load_checkpoint_file(tag_dir / name, unsafe=unsafe_load)["optimizer_state_dict"]
            self.optim_states.append(osd)
        self.bf16 = bool(prefix)
        self._index()

    # ----------------------------------------------------------------- structure
    def _index(self) -> None:
        """Slots of every parameter; checks that each rank's partitions are exactly covered."""
        shapes = self.meta.get("param_shapes")
        if not shapes:
            raise ValueError(f"{self.tag_dir}: model states lack param_shapes (not a ZeRO-3 save?)")
        if self.meta.get("frozen_param_shapes"):
            raise ValueError(f"{self.tag_dir}: frozen parameters are not supported")
        self.slots: dict[str, Slot] = {}
        step = None
        for d, osd in enumerate(self.optim_states):
            where = f"{self.tag_dir}: dp={d}"
            stage = int(getattr(osd.get("zero_stage"), "value", osd.get("zero_stage", -1)))
            if stage != 3:
                raise ValueError(f"{where}: optimizer file says ZeRO stage {stage}, not 3")
            if int(osd.get("partition_count", self.dp)) != self.dp:
                raise ValueError(f"{where}: partition_count {osd['partition_count']} != "
                                 f"DP {self.dp}")
            flats = osd["fp32_flat_groups"]
            inner = osd["optimizer_state_dict"]
            if len(inner["param_groups"]) != 1:
                raise ValueError(f"{where}: {len(inner['param_groups'])} optimizer param groups "
                                 "(one supported)")
            if len(flats) != len(shapes) or len(inner["state"]) != len(flats):
                raise ValueError(f"{where}: {len(flats)} fp32 partitions, {len(inner['state'])} "
                                 f"optimizer states, {len(shapes)} parameter groups")
            for g, flat in enumerate(flats):
                state = inner["state"][g]
                for key in STATE_KEYS:
                    if state[key].numel() != flat.numel():
                        raise ValueError(f"{where} group {g}: {key} size differs from the fp32 "
                                         "partition")
                s = float(state["step"])
                if step is not None and s != step:
                    raise ValueError(f"{self.tag_dir}: optimizer step differs between partitions "
                                     f"({s} vs {step})")
                step = s
                need = sum(math.ceil(math.prod(shape) / self.dp) for shape in shapes[g].values())
                if need != flat.numel():
                    raise ValueError(f"{where} group {g}: partition holds {flat.numel()} elements, "
                                     f"its parameters need {need}")
        for g, group in enumerate(shapes):
            offset = 0
            for name, shape in group.items():
                chunk = math.ceil(math.prod(shape) / self.dp)
                self.slots[name] = Slot(g, offset, chunk, tuple(shape))
                offset += chunk
        self._step = step or 0.0
        self.full_shapes = {n: s.shape for n, s in self.slots.items()}
        self.glu = detect_glu(self.full_shapes)
        self.rules: dict[str, TpRule] = {n: tp_rule(n, glu=self.glu) for n in self.slots}
        layers = sorted({s[0] for n in self.slots if (s := split_layer_name(n))})
        if not layers:
            raise ValueError(f"{self.tag_dir}: no decoder.layers.* parameters (not a megatron-core "
                             "GPTModel?)")
        if layers != list(range(len(layers))):
            raise ValueError(f"{self.tag_dir}: layer indices {layers} are not contiguous from 0")
        self.num_layers = len(layers)

    # ----------------------------------------------------------------- metadata
    @property
    def step(self) -> float:
        return float(self._step)

    @property
    def global_steps(self) -> int:
        return int(self.meta.get("global_steps", 0))

    @property
    def model_states(self) -> list[dict[str, Any]]:
        """Rank 0's metadata (what :func:`deepspeed_grow._metadata` reads)."""
        return [self.meta]

    def param_groups(self) -> list[dict[str, Any]]:
        return self.optim_states[0]["optimizer_state_dict"]["param_groups"]

    def optimizer_globals(self) -> dict[str, Any]:
        """ZeRO optimizer state without tensors (loss scaling, stage, DP count)."""
        drop = {"optimizer_state_dict", "fp32_flat_groups"}
        return {k: v for k, v in self.optim_states[0].items() if k not in drop}

    def client_state(self) -> dict[str, Any]:
        """Model-state keys that are not DeepSpeed's own nor the module (the trainer's extras)."""
        from lag_ds.checkpoint.deepspeed_source import DeepSpeedCheckpoint

        return DeepSpeedCheckpoint.client_state(self)  # same key filter, reads model_states[0]

    # ----------------------------------------------------------------- tensors
    def _pieces(self, name: str, key: str) -> Iterator[torch.Tensor]:
        """Each DP rank's slice of ``name``, in order, the last one's padding cut off: views
        into the memory-mapped partitions."""
        slot = self.slots[name]
        left = math.prod(slot.shape)
        for osd in self.optim_states:
            if left <= 0:
                return
            flat = (osd["fp32_flat_groups"][slot.group] if key == "fp32"
                    else osd["optimizer_state_dict"]["state"][slot.group][key])
            n = min(slot.chunk, left)
            yield flat.narrow(0, slot.offset, n)
            left -= n

    def full_value(self, name: str, key: str = "fp32", *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The full parameter (``fp32``) or Adam moment, gathered in one copy (``gather.py``)
        into a new fp32 tensor, or into ``out``: never a view, since torch.save would write the
        whole memory-mapped partition."""
        shape = self.slots[name].shape
        return gather_full(shape, self.rules[name], [shape], lambda _: self._pieces(name, key),
                           what=f"{self.tag_dir}: {name}", out=out)

    def prefetch(self, name: str, key: str = "fp32") -> None:
        """Start reading what :meth:`full_value` will read for ``name`` (``gather.willneed``)."""
        willneed(self._pieces(name, key))

    def param_names(self) -> list[str]:
        """Parameters in the order of the flat partitions (module order)."""
        return list(self.slots)

    def value(self, name: str, key: str = "fp32") -> torch.Tensor:
        return self.full_value(name, key)

    def full_shape(self, name: str) -> tuple[int, ...]:
        return self.full_shapes[name]

    def tp_rule(self, name: str) -> TpRule:
        return self.rules[name]


# --------------------------------------------------------------------------- registry hooks
def sniff(path: Path) -> bool:
    return zero3_tag_dir(path) is not None


def info(path: Path, *, unsafe_load: bool = False):
    """Layer count and step from rank 0's ``param_shapes`` (no tensors read)."""
    from lag_ds.checkpoint.formats import CheckpointInfo

    tag_dir = zero3_tag_dir(path)
    meta = load_checkpoint_file(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                                unsafe=unsafe_load)
    names = [n for group in meta.get("param_shapes") or [] for n in group]
    num_layers = len({s[0] for n in names if (s := split_layer_name(n))})
    if num_layers == 0:
        raise ValueError(f"{tag_dir}: no decoder.layers.* parameters "
                         "(not a megatron-core GPTModel?)")
    return CheckpointInfo("deepspeed-zero3", tag_dir, num_layers, int(meta.get("global_steps", 0)),
                          "megatron-core-gpt", 3)


def open_reader(path: Path, *, unsafe_load: bool = False) -> Zero3Checkpoint:
    return Zero3Checkpoint(path, unsafe_load=unsafe_load)


# --------------------------------------------------------------------------- growth
def grow_zero3_checkpoint(
    src: Path, dst: Path, plan, *, target_tp: int | None = None, target_dp: int | None = None,
    optimizer_state: str = "copy", init_std: float = 0.02, show_progress: bool = True,
    unsafe_load: bool = False,
) -> dict[str, Any]:
    """Grow (``plan``) or only convert (``plan=None``) a ZeRO-3 checkpoint into the universal layout
    at ``dst`` (atomically); returns the manifest. Old tensors are copied bit for bit; new layers
    follow :func:`lag_ds.checkpoint.recipes.plan_recipes` like every other format."""
    from lag_ds.checkpoint.atomic import AtomicDirectory, check_free_space
    from lag_ds.checkpoint.deepspeed_grow import (
        OPTIMIZER_STATE_POLICIES,
        _metadata,
        _value,
        moments_rule,
        plan_destinations,
        value_rule,
    )
    from lag_ds.checkpoint.formats import check_destination, progress_bar
    from lag_ds.checkpoint.manifest import BackgroundHasher, write_manifest
    from lag_ds.checkpoint.megatron_layout import layer_name
    from lag_ds.checkpoint.writer import PipelinedWriter
    from lag_ds.faults import fault_point

    if optimizer_state not in OPTIMIZER_STATE_POLICIES:
        raise ValueError(f"--optimizer-state must be one of {OPTIMIZER_STATE_POLICIES}, "
                         f"got {optimizer_state!r}")
    if target_tp not in (None, 1):
        raise ValueError(f"--target-tp {target_tp}: ZeRO-3 output is TP=1 only")
    if target_dp is not None and target_dp < 1:
        raise ValueError(f"--target-dp must be >= 1 (got {target_dp})")
    dst = check_destination(dst)
    ck = Zero3Checkpoint(src, unsafe_load=unsafe_load)
    dests = plan_destinations(ck.param_names(), ck.num_layers, plan, where=str(ck.tag_dir))
    new_layers = plan.new_num_layers if plan else ck.num_layers
    total = sum(math.prod(ck.full_shapes[d.source or layer_name(0, d.suffix)]) for d in dests)
    dst.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(dst.parent, total * 4 * 3)
    with AtomicDirectory(dst) as tmp, BackgroundHasher() as hasher:
        tag_dir = tmp / ck.tag
        zero_dir = tag_dir / "zero"
        zero_dir.mkdir(parents=True)
        bar = progress_bar(show_progress, total=len(dests), desc=f"grow {ck.tag} (ZeRO-3)")
        sizes = [math.prod(ck.full_shapes[d.source or layer_name(0, d.suffix)]) * 4 for d in dests]
        # tensors gathered while the previous one is saved, hashed on the way out (writer.py)
        with PipelinedWriter(budget_bytes=max(sizes), save=hasher.save) as writer:
            for dest, nbytes in zip(dests, sizes):
                folder = zero_dir / dest.name
                folder.mkdir()
                for key in ("fp32", *STATE_KEYS):
                    copies = (value_rule(dest) if key == "fp32" else moments_rule(dest, optimizer_state)) == "copy"
                    writer.save(folder / f"{key}.pt", lambda out, dest=dest, key=key: {
                        "param": _value(ck, dest, key, policy=optimizer_state, std=init_std,
                                        num_layers=new_layers, out=out).contiguous(), "cat_dim": 0},
                        nbytes=nbytes,
                        prefetch=(lambda dest=dest, key=key: ck.prefetch(dest.source, key)) if copies else None)
                # tests kill the write after a parameter's last file (lag_ds.faults)
                writer.save(folder / "step.pt", lambda _: torch.tensor(ck.step),
                            after=lambda path: (fault_point("zero3.param_written", path.parent),
                                                bar.update(1)))
        bar.close()
        groups = [dict(g, params=[]) for g in ck.param_groups()]
        clip = float((ck.meta.get("ds_config") or {}).get("gradient_clipping", 0.0))
        torch.save({**ck.optimizer_globals(), "param_groups": groups,
                    "ds_version": ck.meta.get("ds_version"), "clip_grad": clip,
                    # what stage 3 reads: the step of state[0] and the groups' hyperparameters
                    "optimizer_state_dict": {"state": {0: {"step": torch.tensor(ck.step)}},
                                             "param_groups": groups}},
                   zero_dir / "optimizer_state.pt")
        fault_point("zero3.optimizer_state_written", zero_dir)
        meta = _metadata(ck, tp=1, num_layers=new_layers, module={}, universal=True)
        torch.save(meta, tag_dir / "mp_rank_00_model_states.pt")  # stage 1/2 and lag_ds readers
        torch.save(meta, tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt")  # stage 3
        (tmp / UNIVERSAL_POINTER).write_text(ck.tag)
        manifest = write_manifest(
            tmp, kind="deepspeed-universal", known_hashes=hasher.results(),
            source={"path": str(Path(src).resolve()), "tag": ck.tag, "tp": 1, "dp": ck.dp,
                    "zero_stage": 3, "num_layers": ck.num_layers, "global_steps": ck.global_steps,
                    "glu": ck.glu, "bf16": ck.bf16},
            plan=plan.to_dict() if plan else None,
            extra={
                "num_layers": new_layers, "target_tp": 1, "target_dp": target_dp or ck.dp,
                "optimizer_state": optimizer_state, "init_std": init_std, "step": ck.step,
                "loads_with": {"checkpoint": {"load_universal": True}},
                "note": "universal layout from ZeRO-3: loads with ZeRO-3 (or 1/2) at any DP, TP=1",
                "new_layer_optimizer_state": {
                    "duplicate/zero": (f"{optimizer_state} "
                                       "(zeroed output projections: zero moments)"),
                    "random/zero-random": "zero moments",
                },
            },
        )
    return manifest
