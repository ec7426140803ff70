"""Read a DeepSpeed ``PipelineModule`` checkpoint (layer files), validated before anything is grown.

Layout (DeepSpeed's ``PipelineModule.save_state_dict`` and engine, see ``FORMATS.md``)::

    TAG/layer_{idx:02d}[-model_{tp:02d}]-model_states.pt     one layer's state dict per TP rank
    TAG/mp_rank_{pp*tp_size+tp:02d}_model_states.pt          per (stage, TP): metadata, param_shapes
    TAG/{bf16_}zero_pp_rank_{dp}_mp_rank_{pp*tp_size+tp:02d}_optim_states.pt
                                                            per (stage, TP, DP): flat fp32 partition,
                                                            Adam moments, param_slice_mappings

Optimizer files are ZeRO-1's or ``BF16_Optimizer``'s (bf16 with ZeRO-0 or fp32 accumulation); both
hold the same keys. fp32 ZeRO-0 (a torch optimizer inside the mp_rank files) is refused.

Roles come from names and shapes only: a layer file is a transformer layer when its keys match a
family's signature (:mod:`.layer_tables`: Megatron-DeepSpeed ``self_attention.*``, NeoX
``attention.*``), so Megatron-DeepSpeed's two numberings (layers from ``layer_02`` or ``layer_03``)
and NeoX's (``layer_00`` embedding, norm after a gap) need no offsets. A tied embedding is saved
once, at its first spec index, and named ``tied_modules.<key>.*`` in the module.

Checked before growing (RELIABILITY.md #4), each failure one line naming the file: every index in
``param_shapes`` has its layer files for every TP rank and vice versa; mp_rank count = PP x TP and
agrees with ``mp_world_size`` / ``checkpoint_parallel_dimensions``; optimizer files = PP x TP x DP;
transformer layers numbered without gaps; every element of every parameter covered by exactly its
fragments; one step everywhere; each layer file's values equal the optimizer's fp32 master copy
cast to the file's dtype (a layer file from another run fails here).

    >>> ck = PipeCheckpoint(Path("ckpts"))                            # doctest: +SKIP
    >>> ck.family, ck.num_layers, ck.first_layer_index, (ck.pp, ck.tp, ck.dp)  # doctest: +SKIP
    ('megatron-deepspeed-pipe', 4, 2, (2, 1, 1))
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lag_ds.checkpoint.deepspeed_source import Fragment
from lag_ds.checkpoint.gather import gather_full, willneed
from lag_ds.checkpoint.layer_tables import TABLES, LayerTable, family_of_layer_keys
from lag_ds.checkpoint.megatron_layout import TpRule
from lag_ds.checkpoint.safe_load import load_checkpoint_file

LAYER_FILE = re.compile(r"^layer_(\d+)(-model_(\d+))?-model_states\.pt$")
MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
PIPE_NAME = re.compile(r"^(\d+)\.(.+)$")
STATE_KEYS = ("exp_avg", "exp_avg_sq")


def has_layer_files(path: Path) -> bool:
    return path.is_dir() and any(LAYER_FILE.match(p.name) for p in path.iterdir())


def resolve_pipe_dir(src: Path) -> Path | None:
    """The tag directory holding layer files: ``src`` itself or the one ``src/latest`` names."""
    src = Path(src)
    if has_layer_files(src):
        return src
    latest = src / "latest"
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        if tag and "/" not in tag and has_layer_files(src / tag):
            return src / tag
    return None


class PipeCheckpoint:
    """A validated, lazily read pipeline checkpoint (one tag directory)."""

    format = "deepspeed-pipe"

    def __init__(self, src: Path, *, unsafe_load: bool = False) -> None:
        tag_dir = resolve_pipe_dir(Path(src))
        if tag_dir is None:
            raise ValueError(f"--src {src}: no layer_*-model_states.pt files (not a pipeline checkpoint)")
        self.tag_dir, self.tag, self.unsafe = tag_dir, tag_dir.name, unsafe_load
        names = sorted(p.name for p in tag_dir.iterdir())
        self._index_files(names)
        self._read_model_states()
        self._read_optimizer_files(names)
        self._assign_roles()
        self._check_coverage()
        self._check_layer_values()

    def _load(self, name: str) -> Any:
        return load_checkpoint_file(self.tag_dir / name, unsafe=self.unsafe)

    # ------------------------------------------------------------------ files and topology
    def _index_files(self, names: list[str]) -> None:
        found: dict[int, dict[int, str]] = {}
        axes = set()
        for name in names:
            if m := LAYER_FILE.match(name):
                axes.add(m.group(3) is not None)
                found.setdefault(int(m.group(1)), {})[int(m.group(3) or 0)] = name
        if len(axes) > 1:
            raise ValueError(f"{self.tag_dir}: layer files mix '-model_XX' and plain names")
        self.model_axis = axes == {True}
        self.tp = max(len(ranks) for ranks in found.values())
        for idx, ranks in sorted(found.items()):
            if sorted(ranks) != list(range(self.tp)):
                missing = next(t for t in range(self.tp) if t not in ranks)
                raise ValueError(f"{self.tag_dir / self.layer_file_name(idx, missing)}: missing "
                                 f"(layer {idx} has TP ranks {sorted(ranks)}, others have {self.tp})")
        self.layer_files = found
        self.model_files = sorted(n for n in names if MODEL_FILE.match(n))
        ranks = [int(MODEL_FILE.match(n).group(1)) for n in self.model_files]
        if not ranks or ranks != list(range(len(ranks))):
            raise ValueError(f"{self.tag_dir}: mp_rank_XX_model_states.pt files {ranks} are not 0..M-1")
        if len(ranks) % self.tp:
            raise ValueError(f"{self.tag_dir}: {len(ranks)} mp_rank files do not divide by TP={self.tp} "
                             f"(the layer files' TP degree)")
        self.pp = len(ranks) // self.tp

    def layer_file_name(self, idx: int, tp: int) -> str:
        middle = f"-model_{tp:02d}" if self.model_axis else ""
        return f"layer_{idx:02d}{middle}-model_states.pt"

    def _read_model_states(self) -> None:
        self.model_states = [self._load(n) for n in self.model_files]
        meta = self.model_states[0]
        self.dp = int(meta.get("dp_world_size", 1))
        self.global_steps = int(meta.get("global_steps", 0))
        self.ds_config = meta.get("ds_config", {}) or {}
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.bf16 = bool(self.ds_config.get("bf16", {}).get("enabled", False))
        self.stage_params: list[list[str]] = []  # per mp rank: parameter names in optimizer order
        self.local_shapes: list[dict[str, tuple[int, ...]]] = []
        for name, states in zip(self.model_files, self.model_states):
            if int(states.get("mp_world_size", len(self.model_files))) != len(self.model_files):
                raise ValueError(f"{self.tag_dir / name}: says mp_world_size={states['mp_world_size']} "
                                 f"but there are {len(self.model_files)} mp_rank files (missing stage?)")
            dims = states.get("checkpoint_parallel_dimensions")
            if dims and (dims.get("tp_degree"), dims.get("pp_degree")) != (self.tp, self.pp):
                raise ValueError(f"{self.tag_dir / name}: says PP={dims.get('pp_degree')} x "
                                 f"TP={dims.get('tp_degree')}, files say PP={self.pp} x TP={self.tp}")
            if int(states.get("global_steps", 0)) != self.global_steps:
                raise ValueError(f"{self.tag_dir / name}: global_steps {states.get('global_steps')} "
                                 f"differs from mp_rank_00's {self.global_steps}")
            groups = states.get("param_shapes")  # None when BF16_Optimizer runs without ZeRO
            shapes = {k: tuple(v) for g in groups or [] for k, v in g.items()}
            self.stage_params.append(list(shapes))
            self.local_shapes.append(shapes)

    def _read_optimizer_files(self, names: list[str]) -> None:
        optim = [(m.group(1) or "", int(m.group(2)), int(m.group(3))) for n in names
                 if (m := OPTIM_FILE.match(n))]
        if not optim:
            kind = "bf16" if self.bf16 else "fp32"
            raise ValueError(f"{self.tag_dir}: no zero_pp_rank_*_optim_states.pt files ({kind} ZeRO-"
                             f"{self.zero_stage} pipeline checkpoints with the optimizer inside the "
                             "mp_rank files are not supported)")
        prefix = optim[0][0]
        expected = {(d, m) for d in range(self.dp) for m in range(len(self.model_files))}
        found = {(d, m) for p, d, m in optim if p == prefix}
        if missing := sorted(expected - found):
            d, m = missing[0]
            raise ValueError(f"{self.tag_dir / f'{prefix}zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt'}"
                             f": missing (expected DP={self.dp} x {len(self.model_files)} mp ranks)")
        if extra := sorted(found - expected) + [(d, m) for p, d, m in optim if p != prefix]:
            d, m = extra[0]
            raise ValueError(f"{self.tag_dir}: unexpected optimizer file for dp={d} mp_rank={m} "
                             f"(checkpoint says DP={self.dp}, {len(self.model_files)} mp ranks)")
        self.optim_prefix = prefix
        self.optim = [[self._load(f"{prefix}zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt")
                       ["optimizer_state_dict"] for d in range(self.dp)]
                      for m in range(len(self.model_files))]
        self.step: float | None = None
        self.fragments = [self._fragments(m) for m in range(len(self.model_files))]

    def _fragments(self, m: int) -> dict[str, list[Fragment]]:
        frags: dict[str, list[Fragment]] = {}
        where = f"{self.tag_dir}/{self.optim_prefix}zero_pp_rank_*_mp_rank_{m:02d}_optim_states.pt"
        for d, osd in enumerate(self.optim[m]):
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                state = osd["base_optimizer_state"]["state"][g]
                part = osd["single_partition_of_fp32_groups"][g].numel()
                step = float(state["step"])
                if self.step is None:
                    self.step = step
                elif step != self.step:
                    raise ValueError(f"{where}: optimizer step {step} differs from {self.step}")
                for key in STATE_KEYS:
                    if state[key].numel() != part:
                        raise ValueError(f"{where}: dp={d} group {g}: {key} size differs from fp32")
                for name, addr in mapping.items():
                    if addr.start + addr.numel > part:
                        raise ValueError(f"{where}: fragment of {name} runs past partition dp={d}")
                    frags.setdefault(name, []).append(Fragment(d, g, int(addr.start), int(addr.numel)))
        if not self.stage_params[m]:
            self.stage_params[m] = list(frags)
        elif set(frags) != set(self.local_shapes[m]):
            odd = sorted(set(frags) ^ set(self.local_shapes[m]))[0]
            raise ValueError(f"{where}: optimizer and param_shapes disagree on {odd}")
        return frags

    def _check_coverage(self) -> None:
        for m, frags in enumerate(self.fragments):
            if not self.local_shapes[m]:  # no param_shapes: the layer files give the shapes
                files = {}
                for name in self.stage_params[m]:
                    idx, key = self.file_of[name]
                    if idx not in files:
                        files[idx] = self._load(self.layer_files[idx][m % self.tp])
                    self.local_shapes[m][name] = tuple(files[idx][key].shape)
            shapes = self.local_shapes[m]
            for name, pieces in frags.items():
                if sum(f.numel for f in pieces) != math.prod(shapes[name]):
                    raise ValueError(f"{self.tag_dir / self.model_files[m]}: the optimizer's fragments "
                                     f"of {name} do not cover its shape {shapes[name]}")

    # ------------------------------------------------------------------ roles
    def _assign_roles(self) -> None:
        referenced = {}  # spec index -> mp rank (first stage) holding it
        tied: dict[str, set[str]] = {}
        for m, params in enumerate(self.stage_params):
            for name in params:
                if match := PIPE_NAME.match(name):
                    referenced.setdefault(int(match.group(1)), m)
                elif name.startswith("tied_modules."):
                    key, _, rest = name[len("tied_modules."):].partition(".")
                    tied.setdefault(key, set()).add(rest)
                else:
                    raise ValueError(f"{self.tag_dir / self.model_files[m]}: parameter {name} is not "
                                     "named like a pipe module's (<index>.<name> or tied_modules.*)")
        self.file_keys = {idx: list(self._load(files[0]).keys())
                          for idx, files in self.layer_files.items()}
        for idx in sorted(referenced):
            if idx not in self.layer_files:
                raise ValueError(f"{self.tag_dir / self.layer_file_name(idx, 0)}: missing (parameters "
                                 f"{idx}.* are in {self.model_files[referenced[idx]]})")
        self.tied_index: dict[str, int] = {}
        for key, rests in tied.items():
            matches = [i for i, ks in self.file_keys.items() if i not in referenced and set(ks) >= rests]
            if not matches:
                raise ValueError(f"{self.tag_dir}: no layer file holds the tied module {key!r}")
            self.tied_index[key] = min(matches)
        owners = set(referenced) | set(self.tied_index.values())
        for idx in sorted(set(self.layer_files) - owners):
            raise ValueError(f"{self.tag_dir / self.layer_file_name(idx, 0)}: no mp_rank file's "
                             "param_shapes names this layer (a layer file from another run?)")
        families = {f for i in self.layer_files if (f := family_of_layer_keys(self.file_keys[i]))}
        if len(families) != 1:
            raise ValueError(f"{self.tag_dir}: cannot tell the model family from the layer files "
                             f"(found {sorted(families) or 'no transformer layers'})")
        self.family = families.pop()
        self.table: LayerTable = TABLES[self.family]
        layers = sorted(i for i in self.layer_files if self.table.is_layer(self.file_keys[i]))
        for a, b in zip(layers, layers[1:]):
            if b != a + 1:
                raise ValueError(f"{self.tag_dir / self.layer_file_name(b, 0)}: gap in the transformer "
                                 f"layer numbering (previous layer file is layer_{a:02d})")
        self.layer_indices = layers
        self.first_layer_index, self.num_layers = layers[0], len(layers)
        self.last_layer_index = layers[-1]
        # module-order tensor names and where each comes from
        self.names: list[str] = []
        self.file_of: dict[str, tuple[int, str]] = {}  # pipe name -> (spec index, layer-file key)
        param_set = {n for params in self.stage_params for n in params}
        tie_at = {i: k for k, i in self.tied_index.items()}
        for idx in sorted(self.layer_files):
            prefix = f"tied_modules.{tie_at[idx]}." if idx in tie_at else f"{idx}."
            for key in self.file_keys[idx]:
                if prefix + key in param_set:
                    self.names.append(prefix + key)
                    self.file_of[prefix + key] = (idx, key)
        missing = param_set - set(self.names)
        if missing:
            raise ValueError(f"{self.tag_dir}: parameter {sorted(missing)[0]} is in no layer file")
        self.holder: dict[tuple[str, int], int] = {}  # (name, tp rank) -> first mp_rank holding it
        for m, params in enumerate(self.stage_params):
            for name in params:
                self.holder.setdefault((name, m % self.tp), m)

    def role(self, idx: int) -> str:
        return self.table.role(self.file_keys[idx])

    # ------------------------------------------------------------------ tensors
    def tp_rule(self, name: str) -> TpRule:
        return self.table.tp_rule(self.file_of[name][1])

    def local_shape(self, name: str, tp: int) -> tuple[int, ...]:
        return self.local_shapes[self.holder[(name, tp)]][name]

    def full_shape(self, name: str) -> tuple[int, ...]:
        rule, shape = self.tp_rule(name), list(self.local_shape(name, 0))
        if rule.cat_dim is not None:
            shape[rule.cat_dim] = sum(self.local_shape(name, t)[rule.cat_dim] for t in range(self.tp))
        return tuple(shape)

    def param_names(self) -> list[str]:
        return list(self.names)

    def _pieces(self, name: str, tp: int, key: str) -> Iterator[torch.Tensor]:
        """Fragments of ``name`` on TP rank ``tp``, in order: views into the mapped partitions."""
        m = self.holder[(name, tp)]
        for frag in self.fragments[m][name]:
            osd = self.optim[m][frag.dp_rank]
            flat = (osd["single_partition_of_fp32_groups"][frag.group] if key == "fp32"
                    else osd["base_optimizer_state"]["state"][frag.group][key])
            yield flat.narrow(0, frag.start, frag.numel)

    def local_value(self, name: str, tp: int, key: str = "fp32") -> torch.Tensor:
        pieces = list(self._pieces(name, tp, key))
        joined = pieces[0].clone() if len(pieces) == 1 else torch.cat(pieces)  # never a view
        return joined.float().reshape(self.local_shapes[self.holder[(name, tp)]][name])

    def prefetch(self, name: str, key: str = "fp32") -> None:
        """Start reading what :meth:`value` will read for ``name`` (``gather.willneed``)."""
        willneed(piece for t in range(self.tp) for piece in self._pieces(name, t, key))

    def value(self, name: str, key: str = "fp32", *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The TP-merged value, gathered in one copy (``gather.py``), into ``out`` if given."""
        shapes = [self.local_shapes[self.holder[(name, t)]][name] for t in range(self.tp)]
        rule = self.tp_rule(name)
        full_shape = list(shapes[0])
        if rule.cat_dim is not None:
            full_shape[rule.cat_dim] = sum(s[rule.cat_dim] for s in shapes)
        return gather_full(tuple(full_shape), rule, shapes, lambda t: self._pieces(name, t, key),
                           what=f"{self.tag_dir}: {name}", out=out)

    def layer_file(self, idx: int, tp: int) -> Path:
        return self.tag_dir / self.layer_files[idx][tp]

    def _check_layer_values(self) -> None:
        """Each layer file's tensors equal the optimizer's fp32 master cast to the file's dtype."""
        by_file: dict[int, list[str]] = {}
        for name in self.names:
            by_file.setdefault(self.file_of[name][0], []).append(name)
        for idx, names in sorted(by_file.items()):
            for tp in range(self.tp):
                state = self._load(self.layer_files[idx][tp])
                for name in names:
                    self._check_value(idx, tp, name, state[self.file_of[name][1]])

    def _check_value(self, idx: int, tp: int, name: str, stored: torch.Tensor) -> None:
        key = self.file_of[name][1]
        master = self.local_value(name, tp)
        if tuple(stored.shape) != tuple(master.shape) or not torch.equal(
                stored, master.to(stored.dtype)):
            raise ValueError(f"{self.layer_file(idx, tp)}: {key} disagrees with the optimizer "
                             "state's fp32 master copy (a layer file from another run?)")

    def param_groups(self) -> list[dict[str, Any]]:
        return self.optim[0][0]["base_optimizer_state"]["param_groups"]

    def optimizer_globals(self) -> dict[str, Any]:
        drop = {"base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings"}
        return {k: v for k, v in self.optim[0][0].items() if k not in drop}


def open_reader(path: Path, *, unsafe_load: bool = False) -> PipeCheckpoint:
    return PipeCheckpoint(path, unsafe_load=unsafe_load)
