"""Execute a growth plan on a DeepSpeed checkpoint of a megatron-core GPTModel, with optimizer state.

Output layout, chosen per source ZeRO stage (and why):

* **ZeRO 1/2 → DeepSpeed's universal layout** (``TAG/zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt``
  with full, TP-merged tensors, ``TAG/zero/optimizer_state.pt``, a metadata-only
  ``TAG/mp_rank_00_model_states.pt``, and ``latest_universal``). Stock DeepSpeed loads it with
  ``{"checkpoint": {"load_universal": true}}`` at *any* DP degree and any TP degree dividing the
  split dimensions (each file carries ``cat_dim`` and, for the GLU fc1, ``param_n_sub_params=2``),
  which is exactly what LAG needs: candidates train on slices, the winner continues on the whole
  allocation. Native partitions would tie the output to one DP degree and to DeepSpeed's private
  alignment rules. Per-parameter files also let candidates share unchanged tensors by hard link.
* **ZeRO 0 → native files per target TP rank** (``mp_rank_XX_model_states.pt`` with the module
  shard and the torch optimizer state): stock DeepSpeed ignores universal checkpoints' module at
  stage 0, and stage-0 files do not depend on DP anyway.

New layers follow the plan: ``copy_from`` (duplicate / zero), or megatron-core's own init with
the plan's per-layer seed (random / zero-random); ``zero_output_projections`` zeroes
``linear_proj`` and ``linear_fc2`` (an identity residual block). Optimizer state of new layers:
``copy`` (default: the source layer's Adam moments) or ``zero``; random layers and zeroed tensors
always get zero moments (there is no meaningful source moment). Old layers' values and moments are
copied bit for bit; every parameter keeps the source's step count.

Everything is written into a temporary sibling directory, fsynced, manifested, renamed
(:class:`AtomicDirectory`); the source is only read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lag_ds.checkpoint.atomic import AtomicDirectory, check_free_space, stored_size
from lag_ds.checkpoint.deepspeed_source import STATE_KEYS, DeepSpeedCheckpoint
from lag_ds.checkpoint.formats import check_destination, progress_bar
from lag_ds.checkpoint.layer_tables import LayerTable, megatron_core_table
from lag_ds.checkpoint.manifest import BackgroundHasher, write_manifest
from lag_ds.checkpoint.megatron_layout import (
    OUTPUT_PROJECTION_SUFFIXES,
    random_layer_param,
    split_tp,
)
from lag_ds.checkpoint.recipes import OPTIMIZER_STATE_POLICIES, TensorKey, plan_recipes
from lag_ds.checkpoint.writer import PipelinedWriter
from lag_ds.faults import fault_point
from lag_ds.growth import GrowthPlan

__all__ = ["OPTIMIZER_STATE_POLICIES", "UNIVERSAL_POINTER", "grow_deepspeed_checkpoint"]
UNIVERSAL_POINTER = "latest_universal"


@dataclass(frozen=True)
class Destination:
    """One parameter of the grown checkpoint and where its value comes from."""

    name: str
    source: str | None  # old parameter name to copy, or None for a fresh random tensor
    is_new: bool
    zero_value: bool = False  # output projection of a `zero` layer
    seed: int | None = None  # random init seed
    suffix: str | None = None


def plan_destinations(param_names: list[str], num_layers: int, plan: GrowthPlan | None, *,
                      where: str = "checkpoint", table: LayerTable | None = None) -> list[Destination]:
    """The grown model's parameters, in module order (embeddings, layers 0..L+k-1, final norm, head).

    The plan is executed by :func:`lag_ds.checkpoint.recipes.plan_recipes` (the one executor every
    format shares); this maps its format-neutral recipes onto megatron-core names."""
    if plan is None:
        return [Destination(n, n, False) for n in param_names]
    if plan.old_num_layers != num_layers:
        raise ValueError(f"--op is planned for {plan.old_num_layers} layers but {where} has {num_layers}")
    table = table or megatron_core_table(param_names)  # decoder (GPT) or encoder (BERT) layers
    split_layer_name, layer_name = table.split_layer_name, table.layer_name
    keys = [TensorKey(*split) if (split := split_layer_name(n)) else TensorKey(None, n)
            for n in param_names]
    recipes = plan_recipes(keys, plan, is_output_projection=lambda s: s in OUTPUT_PROJECTION_SUFFIXES)
    out = []
    for r in recipes:
        if r.dst.layer is None:
            out.append(Destination(r.dst.name, r.dst.name, False))
            continue
        source = None if r.value == "random" else layer_name(r.src.layer, r.src.name)
        out.append(Destination(layer_name(r.dst.layer, r.dst.name), source, r.is_new,
                               r.value == "zero", r.seed, r.dst.name))
    return out


def value_rule(dest: Destination) -> str:
    """``copy`` the source tensor, ``zero`` it, or draw a ``random`` one."""
    return "random" if dest.source is None else "zero" if dest.zero_value else "copy"


def moments_rule(dest: Destination, policy: str) -> str:
    """Adam moments: ``copy`` the source's or ``zero`` (random layers, zeroed tensors, policy zero)."""
    if dest.source is None or dest.zero_value or (dest.is_new and policy == "zero"):
        return "zero"
    return "copy"


def fresh_value(dest: Destination, shape: tuple[int, ...], *, std: float, num_layers: int) -> torch.Tensor:
    if value_rule(dest) == "zero":
        return torch.zeros(shape)
    return random_layer_param(dest.suffix, shape, std=std, num_layers=num_layers, seed=dest.seed)


def _value(ckpt: DeepSpeedCheckpoint, dest: Destination, key: str, *, policy: str, std: float,
           num_layers: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """One full (TP-merged) tensor of a destination: its fp32 value or one Adam moment (in
    ``out``, a reused buffer of the right size, where given; a random init is always fresh).

    One key at a time keeps peak memory at about one full tensor (plus its TP shards): a 256k x
    2048 embedding's value and two moments are 6 GB together, 2 GB apart.
    """
    shape = ckpt.full_shapes[dest.source or ckpt.layer_table.layer_name(0, dest.suffix)]
    rule = value_rule(dest) if key == "fp32" else moments_rule(dest, policy)
    if rule == "copy":
        return ckpt.full_value(dest.source, key, out=out)
    if key == "fp32" and rule == "random":
        return fresh_value(dest, shape, std=std, num_layers=num_layers)
    return torch.zeros(shape) if out is None else out.view(shape).zero_()


def _values(ckpt: DeepSpeedCheckpoint, dest: Destination, *, policy: str, std: float,
            num_layers: int) -> dict[str, torch.Tensor]:
    return {key: _value(ckpt, dest, key, policy=policy, std=std, num_layers=num_layers)
            for key in ("fp32", *STATE_KEYS)}


def grow_deepspeed_checkpoint(
    src: Path, dst: Path, plan: GrowthPlan | None, *, target_tp: int | None = None, target_dp: int | None = None,
    optimizer_state: str = "copy", init_std: float = 0.02, show_progress: bool = True, unsafe_load: bool = False,
) -> dict[str, Any]:
    """Grow (``plan``) and/or reshard (``plan=None``) ``src`` into the new directory ``dst``; returns the manifest."""
    if optimizer_state not in OPTIMIZER_STATE_POLICIES:
        raise ValueError(f"--optimizer-state must be one of {OPTIMIZER_STATE_POLICIES}, got {optimizer_state!r}")
    dst = check_destination(dst)
    ckpt = DeepSpeedCheckpoint(src, unsafe_load=unsafe_load)
    tp = target_tp or ckpt.tp
    dp = target_dp or ckpt.dp
    if tp < 1 or dp < 1:
        raise ValueError(f"--target-tp/--target-dp must be >= 1 (got {tp}, {dp})")
    dests = plan_destinations(ckpt.param_names, ckpt.num_layers, plan, where=str(ckpt.tag_dir),
                              table=ckpt.layer_table)
    new_layers = plan.new_num_layers if plan else ckpt.num_layers
    for name, shape in ckpt.full_shapes.items():  # every split dimension must divide by the target TP
        rule = ckpt.rules[name]
        if rule.cat_dim is not None and shape[rule.cat_dim] % (tp * rule.num_sub_params):
            raise ValueError(f"--target-tp {tp}: {name} dimension {rule.cat_dim} (size {shape[rule.cat_dim]}) is not divisible")
    dst.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(dst.parent, _estimate_bytes(ckpt, dests, tp=tp), destination=dst)

    universal = ckpt.zero_stage > 0
    with AtomicDirectory(dst) as tmp, BackgroundHasher() as hasher:
        tag_dir = tmp / ckpt.tag
        tag_dir.mkdir()
        bar = progress_bar(show_progress, total=len(dests) * (1 if universal else tp), desc=f"grow {ckpt.tag}")
        if universal:
            _write_universal(ckpt, tag_dir, dests, policy=optimizer_state, std=init_std, num_layers=new_layers, bar=bar,
                             hasher=hasher)
            (tmp / UNIVERSAL_POINTER).write_text(ckpt.tag)
        else:
            _write_stage0(ckpt, tag_dir, dests, tp=tp, policy=optimizer_state, std=init_std,
                          num_layers=new_layers, bar=bar)
            (tmp / "latest").write_text(ckpt.tag)
        bar.close()
        manifest = write_manifest(
            tmp, kind="deepspeed-universal" if universal else "deepspeed-zero0", known_hashes=hasher.results(),
            source={"path": str(Path(src).resolve()), "tag": ckpt.tag, "tp": ckpt.tp, "dp": ckpt.dp,
                    "zero_stage": ckpt.zero_stage, "num_layers": ckpt.num_layers, "global_steps": ckpt.global_steps,
                    "glu": ckpt.glu},
            plan=plan.to_dict() if plan else None,
            extra={
                "num_layers": new_layers, "target_tp": tp, "target_dp": dp, "optimizer_state": optimizer_state,
                "init_std": init_std, "step": ckpt.step,
                "loads_with": {"checkpoint": {"load_universal": True}} if universal else {},
                "note": ("universal layout: loads at any DP degree and any TP dividing the split dimensions"
                         if universal else f"native ZeRO-0 files for TP={tp} (DP-independent)"),
                "new_layer_optimizer_state": {
                    "duplicate/zero": f"{optimizer_state} (zeroed output projections: zero moments)",
                    "random/zero-random": "zero moments",
                },
            },
        )
    return manifest


def _estimate_bytes(ckpt: DeepSpeedCheckpoint, dests: list[Destination], *, tp: int) -> int:
    """What the output will take on disk: universal = one file per parameter and key (fp32 +
    two moments + step), ZeRO-0 = module + fp32 masters + moments per TP rank, plus metadata."""
    layer_name = ckpt.layer_table.layer_name
    sizes = [math.prod(ckpt.full_shapes[d.source or layer_name(0, d.suffix)]) * 4 for d in dests]
    if ckpt.zero_stage:
        per_param = sum(3 * stored_size(n) + stored_size(8) for n in sizes)
        return per_param + stored_size(1 << 16) * 2
    return tp * stored_size(sum(sizes) * 4 // tp + (1 << 16))


def _write_universal(ckpt: DeepSpeedCheckpoint, tag_dir: Path, dests: list[Destination], *, policy: str,
                     std: float, num_layers: int, bar: Any, hasher: BackgroundHasher) -> None:
    """One folder per parameter; each tensor is gathered in one copy (``gather.py``) while the
    previous one is saved (``writer.py``), then hashed and fsynced in the background."""
    zero_dir = tag_dir / "zero"
    zero_dir.mkdir()
    step = torch.tensor(ckpt.step)
    layer_name = ckpt.layer_table.layer_name
    like = [d.source or layer_name(0, d.suffix) for d in dests]  # a parameter of the same shape
    sizes = [math.prod(ckpt.full_shapes[n]) * 4 for n in like]
    with PipelinedWriter(budget_bytes=max(sizes), save=hasher.save) as writer:
        for dest, name, nbytes in zip(dests, like, sizes):
            rule = ckpt.rules[name]
            folder = zero_dir / dest.name
            folder.mkdir()
            meta: dict[str, Any] = {"cat_dim": rule.cat_dim or 0}
            if rule.num_sub_params > 1:
                meta["param_n_sub_params"] = rule.num_sub_params
            for key in ("fp32", *STATE_KEYS):
                copies = (value_rule(dest) if key == "fp32" else moments_rule(dest, policy)) == "copy"
                writer.save(
                    folder / f"{key}.pt",
                    lambda out, dest=dest, key=key: {"param": _value(
                        ckpt, dest, key, policy=policy, std=std, num_layers=num_layers,
                        out=out).contiguous(), **meta},
                    nbytes=nbytes,
                    prefetch=(lambda dest=dest, key=key: ckpt.prefetch(dest.source, key)) if copies else None,
                    after=lambda path, key=key: fault_point(f"deepspeed.{key}_written", path.parent))
            writer.save(folder / "step.pt", lambda _: step.clone(),
                        after=lambda path: (fault_point("deepspeed.param_written", path.parent), bar.update(1)))
    groups = [dict(g, params=[]) for g in ckpt.param_groups()]
    torch.save({**ckpt.optimizer_globals(), "param_groups": groups}, zero_dir / "optimizer_state.pt")
    fault_point("deepspeed.optimizer_state_written", zero_dir)
    torch.save(_metadata(ckpt, tp=1, num_layers=num_layers, module={}, universal=True),
               tag_dir / "mp_rank_00_model_states.pt")


def _write_stage0(ckpt: DeepSpeedCheckpoint, tag_dir: Path, dests: list[Destination], *, tp: int, policy: str,
                  std: float, num_layers: int, bar: Any) -> None:
    extra_keys = _extra_state_keys(ckpt, num_layers)
    for rank in range(tp):
        module: dict[str, Any] = {}
        state: dict[int, dict[str, Any]] = {}
        for index, dest in enumerate(dests):
            values = _values(ckpt, dest, policy=policy, std=std, num_layers=num_layers)
            rule = ckpt.rules[dest.source or ckpt.layer_table.layer_name(0, dest.suffix)]
            shard = {k: split_tp(v, rule, tp, rank).clone() for k, v in values.items()}
            module[dest.name] = shard["fp32"]
            state[index] = {"step": torch.tensor(ckpt.step), **{k: shard[k] for k in STATE_KEYS}}
            bar.update(1)
        for key in extra_keys:
            module[key] = None
        groups = ckpt.param_groups()
        if len(groups) != 1:
            raise ValueError(f"{ckpt.tag_dir}: ZeRO-0 growth supports one optimizer param group, found {len(groups)}")
        optimizer: dict[str, Any] = {"state": state,
                                     "param_groups": [dict(groups[0], params=list(range(len(dests))))]}
        if ckpt.mixed_precision_stage0:  # bf16/fp16 wrapper: fp32 masters beside the torch state
            dtype = next(v.dtype for v in ckpt.model_states[0]["module"].values()
                         if isinstance(v, torch.Tensor))
            wrapper = {k: v for k, v in ckpt.model_states[0]["optimizer"].items()
                       if k not in ("optimizer_state_dict", "fp32_groups")}
            masters = [module[d.name] for d in dests]
            for d in dests:
                module[d.name] = module[d.name].to(dtype)
            optimizer = {**wrapper, "optimizer_state_dict": optimizer, "fp32_groups": [masters]}
        meta = _metadata(ckpt, tp=tp, num_layers=num_layers, module=module, universal=False)
        meta["optimizer"] = optimizer
        torch.save(meta, tag_dir / f"mp_rank_{rank:02d}_model_states.pt")
        fault_point("deepspeed.rank_written", tag_dir)


def _extra_state_keys(ckpt: DeepSpeedCheckpoint, num_layers: int) -> list[str]:
    keys = []
    split_layer_name, layer_name = ckpt.layer_table.split_layer_name, ckpt.layer_table.layer_name
    layer_suffixes = [s[1] for k in ckpt.extra_state_keys if (s := split_layer_name(k)) and s[0] == 0]
    for key in ckpt.extra_state_keys:
        if split_layer_name(key) is None:
            keys.append(key)
    for layer in range(num_layers):
        keys += [layer_name(layer, s) for s in layer_suffixes]
    return keys


def _metadata(ckpt: DeepSpeedCheckpoint, *, tp: int, num_layers: int,
              module: dict[str, Any], universal: bool) -> dict[str, Any]:
    src = ckpt.model_states[0]
    client = dict(ckpt.client_state())
    if "num_layers" in client:
        client["num_layers"] = num_layers
    meta = {
        "module": module, "buffer_names": [], "optimizer": None, "param_shapes": None,
        "frozen_param_shapes": None, "shared_params": None, "frozen_param_fragments": None,
        "lr_scheduler": src.get("lr_scheduler"), "data_sampler": None, "random_ltd": None,
        "skipped_steps": src.get("skipped_steps", 0), "global_steps": src.get("global_steps", 0),
        "global_samples": src.get("global_samples", 0), "dp_world_size": src.get("dp_world_size", 1),
        "mp_world_size": tp, "ds_config": src.get("ds_config", {}), "ds_version": src.get("ds_version"),
        **client,
    }
    if universal:
        meta["universal_checkpoint_info"] = {"universal_checkpoint_version": 0.4}
    return meta
