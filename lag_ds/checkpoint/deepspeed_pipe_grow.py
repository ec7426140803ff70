"""Grow a DeepSpeed ``PipelineModule`` checkpoint in layer-partitioned form, optimizer state included.

Output (one tag directory, the source's tag)::

    dst/latest_universal                       -> TAG
    dst/TAG/layer_XX[-model_YY]-model_states.pt  every layer file, renumbered
    dst/TAG/zero/<pipe parameter name>/{fp32,exp_avg,exp_avg_sq,step}.pt
    dst/TAG/zero/optimizer_state.pt
    dst/TAG/mp_rank_{tp:02d}_model_states.pt     metadata (steps, scheduler), one per TP rank
    dst/manifest.json                          written last

Layer files: every file at or after the insertion point moves up by k (final norm and head too);
renumbered and duplicated layers are **hard links** to the source's files (a duplicate's file is
byte-identical to its source layer's); only random / zero-initialised layers are written, in the
source's dtype and TP split. Tools that read layer files (NeoX's HF converter, ``load_state_dir``)
read the grown checkpoint as they read the source.

Optimizer state: DeepSpeed's *universal* layout keyed by the pipe module's parameter names
(``5.mlp.dense_4h_to_h.weight``, ``tied_modules.embed.word_embeddings.weight``), full TP-merged
fp32 tensors with their ``cat_dim``. Why: native ``zero_pp_rank`` files are flat partitions of each
*stage's* parameters at one DP degree, so they would tie the output to one PP x DP layout; the
names in the universal layout are global spec indices, so stock DeepSpeed
(``{"checkpoint": {"load_universal": true}}``, ZeRO-1 or ``BF16_Optimizer``) loads it at any
pipeline and data-parallel degree, and its per-parameter files are what LAG's candidates share.
Old layers' values and moments are bit-identical; new ones follow :mod:`.recipes`.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lag_ds.checkpoint.atomic import AtomicDirectory, check_free_space, stored_size
from lag_ds.checkpoint.deepspeed_pipe import PIPE_NAME, STATE_KEYS, PipeCheckpoint
from lag_ds.checkpoint.formats import check_destination, progress_bar
from lag_ds.checkpoint.manifest import BackgroundHasher, write_manifest
from lag_ds.checkpoint.megatron_layout import split_tp
from lag_ds.checkpoint.recipes import TensorKey, TensorRecipe, plan_recipes, random_tensor
from lag_ds.checkpoint.writer import PipelinedWriter
from lag_ds.faults import fault_point
from lag_ds.growth import GrowthPlan

UNIVERSAL_POINTER = "latest_universal"
MANIFEST_KIND = "deepspeed-pipe-universal"


class _Names:
    """Source pipe names <-> format-neutral keys, and the grown model's names (indices shifted)."""

    def __init__(self, ck: PipeCheckpoint, shift: int) -> None:
        self.ck, self.shift = ck, shift

    def key(self, name: str) -> TensorKey:
        idx, file_key = self.ck.file_of[name]
        if self.ck.first_layer_index <= idx <= self.ck.last_layer_index:
            return TensorKey(idx - self.ck.first_layer_index, file_key)
        return TensorKey(None, name)

    def source(self, key: TensorKey) -> str:
        if key.layer is None:
            return key.name
        return f"{self.ck.first_layer_index + key.layer}.{key.name}"

    def index(self, idx: int) -> int:
        """Grown spec index of a non-layer source index."""
        return idx + self.shift if idx > self.ck.last_layer_index else idx

    def dest(self, key: TensorKey) -> str:
        if key.layer is not None:
            return f"{self.ck.first_layer_index + key.layer}.{key.name}"
        match = PIPE_NAME.match(key.name)
        return f"{self.index(int(match.group(1)))}.{match.group(2)}" if match else key.name


def grow_pipe_checkpoint(src: Path, dst: Path, plan: GrowthPlan | None, *,
                         optimizer_state: str | None = None, init_std: float | None = None,
                         target_tp: int | None = None, target_dp: int | None = None,
                         show_progress: bool = True, unsafe_load: bool = False) -> dict[str, Any]:
    """Grow ``src`` (a pipe checkpoint dir with ``latest``, or its tag dir) into new ``dst``."""
    dst = check_destination(dst)
    optimizer_state = optimizer_state or "copy"
    init_std = 0.02 if init_std is None else init_std
    ck = PipeCheckpoint(src, unsafe_load=unsafe_load)
    if target_tp is not None and target_tp != ck.tp:
        raise ValueError(f"--target-tp {target_tp}: pipeline layer files stay at the source's TP={ck.tp} "
                         "(the universal optimizer state loads at other TP degrees; the files do not)")
    shift = plan.operator.num_new_layers if plan else 0
    names = _Names(ck, shift)
    keys = [names.key(n) for n in ck.param_names()]
    recipes = plan_recipes(keys, plan, is_output_projection=ck.table.is_output_projection,
                           optimizer_state=optimizer_state)
    num_layers = plan.new_num_layers if plan else ck.num_layers
    dst.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(dst.parent, _estimate_bytes(ck, names, recipes, dst.parent), destination=dst)
    counts = {"hard_linked_files": 0, "copied_files": 0, "written_layer_files": 0}
    with AtomicDirectory(dst) as tmp, BackgroundHasher() as hasher:
        tag_dir = tmp / ck.tag
        (tag_dir / "zero").mkdir(parents=True)
        bar = progress_bar(show_progress, total=len(recipes), desc=f"grow {ck.tag}")
        _layer_files(ck, names, recipes, plan, tag_dir, std=init_std, num_layers=num_layers,
                     counts=counts)
        _universal(ck, names, recipes, tag_dir / "zero", std=init_std, num_layers=num_layers, bar=bar,
                   hasher=hasher)
        _model_states(ck, names, recipes, tag_dir, num_layers=num_layers)
        (tmp / UNIVERSAL_POINTER).write_text(ck.tag)
        bar.close()
        manifest = write_manifest(
            tmp, kind=MANIFEST_KIND, known_hashes=hasher.results(),
            source={"path": str(Path(src).resolve()), "tag": ck.tag, "format": ck.format,
                    "family": ck.family, "pp": ck.pp, "tp": ck.tp, "dp": ck.dp,
                    "bf16": ck.bf16, "zero_stage": ck.zero_stage, "num_layers": ck.num_layers,
                    "first_layer_index": ck.first_layer_index, "global_steps": ck.global_steps},
            plan=plan.to_dict() if plan else None,
            extra={"num_layers": num_layers, "step": ck.step, "optimizer_state": optimizer_state,
                   "init_std": init_std, "target_dp": target_dp, "tp": ck.tp,
                   "loads_with": {"checkpoint": {"load_universal": True}},
                   "note": "layer files renumbered (hard links where unchanged); optimizer state in "
                           "DeepSpeed's universal layout keyed by pipe parameter names: loads at "
                           "any PP and DP degree",
                   "new_layer_optimizer_state": {
                       "duplicate/zero": f"{optimizer_state} (zeroed output projections: zero "
                                         "moments)",
                       "random/zero-random": "zero moments"},
                   **counts},
        )
    return manifest


def _by_layer(recipes: list[TensorRecipe]) -> dict[int, list[TensorRecipe]]:
    by_layer: dict[int, list[TensorRecipe]] = {}
    for r in recipes:
        if r.dst.layer is not None:
            by_layer.setdefault(r.dst.layer, []).append(r)
    return by_layer


def _estimate_bytes(ck: PipeCheckpoint, names: _Names, recipes: list[TensorRecipe],
                    parent: Path) -> int:
    """Disk the output takes: universal state (fp32 + 2 moments + step per parameter), layer files
    that are written (new layers; all of them when hard links cannot cross filesystems), and one
    metadata file per TP rank (about the source's size)."""
    universal = sum(3 * stored_size(4 * int(torch.Size(ck.full_shape(names.source(r.src))).numel()))
                    + stored_size(8) for r in recipes)
    same_fs = os.stat(parent).st_dev == os.stat(ck.tag_dir).st_dev

    def size(idx: int) -> int:
        return sum(stored_size(ck.layer_file(idx, tp).stat().st_size) for tp in range(ck.tp))

    layer_bytes = 0 if same_fs else sum(  # embedding, norm, head: links, or copies across devices
        size(idx) for idx in ck.layer_files
        if not ck.first_layer_index <= idx <= ck.last_layer_index)
    for rs in _by_layer(recipes).values():
        if not same_fs or not all(r.value == "copy" for r in rs):
            layer_bytes += size(ck.first_layer_index + rs[0].src.layer)
    meta = sum(stored_size(os.stat(ck.tag_dir / n).st_size) for n in ck.model_files)
    return universal + layer_bytes + meta + stored_size(1 << 16)


def _link(source: Path, target: Path, counts: dict[str, int]) -> None:
    try:
        os.link(source, target)
        counts["hard_linked_files"] += 1
    except OSError:  # another filesystem: a copy is byte-identical too (counted in the manifest)
        shutil.copyfile(source, target)
        counts["copied_files"] += 1
    fault_point("pipe.layer_linked", target.parent)


def _layer_files(ck: PipeCheckpoint, names: _Names, recipes: list[TensorRecipe],
                 plan: GrowthPlan | None, tag_dir: Path, *, std: float, num_layers: int,
                 counts: dict[str, int]) -> None:
    for idx in sorted(ck.layer_files):
        if not ck.first_layer_index <= idx <= ck.last_layer_index:
            for tp in range(ck.tp):
                _link(ck.layer_file(idx, tp), tag_dir / ck.layer_file_name(names.index(idx), tp), counts)
    for layer, layer_recipes in sorted(_by_layer(recipes).items()):
        src_idx = ck.first_layer_index + layer_recipes[0].src.layer
        dst_idx = ck.first_layer_index + layer
        for tp in range(ck.tp):
            target = tag_dir / ck.layer_file_name(dst_idx, tp)
            if all(r.value == "copy" for r in layer_recipes):
                _link(ck.layer_file(src_idx, tp), target, counts)
                continue
            state = dict(ck._load(ck.layer_files[src_idx][tp]))  # buffers and copied tensors
            for r in layer_recipes:
                old = state[r.src.name]
                if r.value == "zero":
                    state[r.dst.name] = torch.zeros_like(old)
                elif r.value == "random":
                    full = _fresh(ck, names, r, std=std, num_layers=num_layers)
                    shard = split_tp(full, ck.table.tp_rule(r.dst.name), ck.tp, tp)
                    state[r.dst.name] = shard.to(old.dtype).contiguous()
                else:
                    state[r.dst.name] = old.clone()
            torch.save(state, target)
            counts["written_layer_files"] += 1
            fault_point("pipe.layer_written", tag_dir)


def _fresh(ck: PipeCheckpoint, names: _Names, r: TensorRecipe, *, std: float,
           num_layers: int) -> torch.Tensor:
    shape = ck.full_shape(names.source(r.src))
    return random_tensor(r.dst.name, shape, std=std, num_layers=num_layers, seed=r.seed,
                         output_projection=ck.table.is_output_projection(r.dst.name))


def _universal(ck: PipeCheckpoint, names: _Names, recipes: list[TensorRecipe], zero_dir: Path, *,
               std: float, num_layers: int, bar: Any, hasher: BackgroundHasher) -> None:
    """One folder per parameter, each tensor gathered while the previous one is saved, hashed
    on the way out (``writer.py``, ``manifest.BackgroundHasher.save``)."""
    step = torch.tensor(ck.step)
    largest = max(math.prod(ck.full_shape(names.source(r.src))) for r in recipes) * 4
    with PipelinedWriter(budget_bytes=largest, save=hasher.save) as writer:
        for r in recipes:
            source = names.source(r.src)
            folder = zero_dir / names.dest(r.dst)
            folder.mkdir()
            rule = ck.tp_rule(source)
            meta: dict[str, Any] = {"cat_dim": rule.cat_dim or 0}
            shape = ck.full_shape(source)
            for key in ("fp32", *STATE_KEYS):
                how = r.value if key == "fp32" else r.moments

                def make(out: torch.Tensor, how: str = how, key: str = key) -> dict[str, Any]:
                    if how == "copy":
                        tensor = ck.value(source, key, out=out)
                    elif how == "random":
                        tensor = _fresh(ck, names, r, std=std, num_layers=num_layers)
                    else:
                        tensor = out.view(shape).zero_()
                    return {"param": tensor.contiguous(), **meta}

                writer.save(folder / f"{key}.pt", make, nbytes=math.prod(shape) * 4,
                            prefetch=(lambda key=key: ck.prefetch(source, key)) if how == "copy" else None)
            writer.save(folder / "step.pt", lambda _: step.clone(),
                        after=lambda path: (fault_point("pipe.param_written", path.parent), bar.update(1)))
    groups = [dict(g, params=[]) for g in ck.param_groups()]
    torch.save({**ck.optimizer_globals(), "param_groups": groups}, zero_dir / "optimizer_state.pt")
    fault_point("pipe.optimizer_state_written", zero_dir)


def _model_states(ck: PipeCheckpoint, names: _Names, recipes: list[TensorRecipe], tag_dir: Path, *,
                  num_layers: int) -> None:
    """One metadata-only ``mp_rank`` file per TP rank (universal loading reads steps from it).

    A layer count the training program stored beside DeepSpeed's keys (``num_layers``, or
    Megatron's ``args.num_layers``, which it checks on load) is set to the grown depth."""
    for tp in range(ck.tp):
        meta = dict(ck.model_states[tp])
        if "num_layers" in meta:
            meta["num_layers"] = num_layers
        if hasattr(meta.get("args"), "num_layers"):
            meta["args"] = copy.copy(meta["args"])
            meta["args"].num_layers = num_layers
        shapes = {names.dest(r.dst): torch.Size(ck.local_shape(names.source(r.src), tp))
                  for r in recipes}
        meta.update(module=None, optimizer=None, param_shapes=[shapes], mp_world_size=ck.tp,
                    checkpoint_parallel_dimensions={"pp_degree": 1, "tp_degree": ck.tp},
                    universal_checkpoint_info={"universal_checkpoint_version": 0.4})
        meta.pop("shared_params", None)
        torch.save(meta, tag_dir / f"mp_rank_{tp:02d}_model_states.pt")
