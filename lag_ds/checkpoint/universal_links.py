"""Materialise a grown candidate from a *universal* base checkpoint, hard-linking what it shares.

Why: LAG grows the same base with every operator of a design space (30 for the paper's 12→16).
In DeepSpeed's universal layout each parameter lives in its own files, which do not contain the
parameter's name, so a candidate's renumbered old layers, its duplicated layers (when their Adam
moments are copied) and every non-layer tensor can be **hard links** to the base's files. Only
random layers, zeroed output projections and zeroed moments are written. 30 candidates of a 1.1B
model then cost little more disk than one.

The base is produced once by :func:`lag_ds.checkpoint.deepspeed_grow.grow_deepspeed_checkpoint`
with ``plan=None`` (native ZeRO-1/2 → universal). Rules for new layers are the same functions
(:func:`value_rule`, :func:`moments_rule`), so a linked candidate equals a fully written one.

    materialise_candidate(Path("out/base_universal"), Path("out/cand/k2-i0-b1-duplicate"), plan)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lag_ds.checkpoint.atomic import AtomicDirectory, check_free_space, stored_size
from lag_ds.checkpoint.deepspeed_grow import (
    OPTIMIZER_STATE_POLICIES,
    UNIVERSAL_POINTER,
    fresh_value,
    moments_rule,
    plan_destinations,
    value_rule,
)
from lag_ds.checkpoint.deepspeed_source import STATE_KEYS
from lag_ds.checkpoint.layer_tables import megatron_core_table
from lag_ds.checkpoint.manifest import read_manifest, write_manifest
from lag_ds.checkpoint.safe_load import load_checkpoint_file
from lag_ds.faults import fault_point
from lag_ds.growth import GrowthPlan

ZERO3_META = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def universal_tag_dir(root: Path) -> Path:
    pointer = Path(root) / UNIVERSAL_POINTER
    if not pointer.is_file():
        raise ValueError(f"{root}: no {UNIVERSAL_POINTER} (not a universal checkpoint)")
    tag_dir = Path(root) / pointer.read_text().strip()
    if not (tag_dir / "zero" / "optimizer_state.pt").is_file():
        raise ValueError(f"{pointer}: names {tag_dir.name!r}, which is not a complete universal checkpoint")
    return tag_dir


def materialise_candidate(base: Path, dst: Path, plan: GrowthPlan, *, optimizer_state: str = "copy",
                          init_std: float = 0.02) -> dict[str, Any]:
    """Write candidate ``dst`` = ``plan`` applied to universal ``base``; returns its manifest."""
    if optimizer_state not in OPTIMIZER_STATE_POLICIES:
        raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATE_POLICIES}, got {optimizer_state!r}")
    base, dst = Path(base), Path(dst)
    base_manifest = read_manifest(base)
    tag_dir = universal_tag_dir(base)
    zero = tag_dir / "zero"
    names = sorted(p.name for p in zero.iterdir() if p.is_dir())
    table = megatron_core_table(names)  # GPT decoder.layers or BERT encoder.layers
    split_layer_name, layer_name = table.split_layer_name, table.layer_name
    layer_params = sorted((n for n in names if split_layer_name(n)), key=split_layer_name)
    num_layers = len({split_layer_name(n)[0] for n in layer_params})
    ordered = [n for n in names if not split_layer_name(n)] + layer_params
    dests = plan_destinations(ordered, num_layers, plan, where=str(base), table=table)
    base_hashes = {(base / rel): meta["sha256"] for rel, meta in base_manifest["files"].items()}
    known: dict[Path, str] = {}
    linked = written = 0
    if dst.parent.is_dir():  # written files are as large as the base's file they replace
        rules = [(zero / (d.source or layer_name(0, d.suffix)), value_rule(d),
                  moments_rule(d, optimizer_state)) for d in dests]
        needed = sum(stored_size((folder / f"{key}.pt").stat().st_size, overhead=0)
                     for folder, value, moments in rules
                     for key, rule in (("fp32", value), *((k, moments) for k in STATE_KEYS))
                     if rule != "copy")
        needed += stored_size((tag_dir / "mp_rank_00_model_states.pt").stat().st_size, overhead=0)
        check_free_space(dst.parent, needed + stored_size(1 << 16), destination=dst)
    with AtomicDirectory(dst) as tmp:
        out_zero = tmp / tag_dir.name / "zero"
        out_zero.mkdir(parents=True)
        for dest in dests:
            folder = out_zero / dest.name
            folder.mkdir()
            source = zero / (dest.source or layer_name(0, dest.suffix))
            plan_keys = {"fp32": value_rule(dest), **{k: moments_rule(dest, optimizer_state) for k in STATE_KEYS}}
            template = None
            for key, rule in plan_keys.items():
                target = folder / f"{key}.pt"
                if rule == "copy":
                    os.link(source / f"{key}.pt", target)
                    known[target] = base_hashes[source / f"{key}.pt"]
                    linked += 1
                    fault_point("links.file_linked", folder)
                    continue
                if template is None:
                    template = load_checkpoint_file(source / "fp32.pt")
                shape = tuple(template["param"].shape)
                meta = {k: v for k, v in template.items() if k != "param"}
                value = (fresh_value(dest, shape, std=init_std, num_layers=plan.new_num_layers)
                         if key == "fp32" else torch.zeros(shape))
                torch.save({"param": value, **meta}, target)
                written += 1
                fault_point("links.file_written", folder)
            os.link(source / "step.pt", folder / "step.pt")
            known[folder / "step.pt"] = base_hashes[source / "step.pt"]
        os.link(zero / "optimizer_state.pt", out_zero / "optimizer_state.pt")
        known[out_zero / "optimizer_state.pt"] = base_hashes[zero / "optimizer_state.pt"]
        meta = load_checkpoint_file(tag_dir / "mp_rank_00_model_states.pt", mmap=False)
        if "num_layers" in meta:
            meta["num_layers"] = plan.new_num_layers
        torch.save(meta, out_zero.parent / "mp_rank_00_model_states.pt")
        if (tag_dir / ZERO3_META).is_file():  # a ZeRO-3 base: stage 3 reads only this name
            torch.save(meta, out_zero.parent / ZERO3_META)
        (tmp / UNIVERSAL_POINTER).write_text(tag_dir.name)
        manifest = write_manifest(
            tmp, kind="deepspeed-universal", known_hashes=known,
            source={"path": str(base.resolve()), "universal_base": True, **base_manifest["source"]},
            plan=plan.to_dict(),
            extra={**base_manifest["extra"], "num_layers": plan.new_num_layers, "optimizer_state": optimizer_state,
                   "init_std": init_std, "hard_linked_files": linked, "written_files": written},
        )
    return manifest


def disk_usage(paths: list[Path]) -> dict[str, int]:
    """Bytes actually used by ``paths`` together (hard links counted once) vs. counted per link."""
    seen: set[tuple[int, int]] = set()
    unique = apparent = 0
    for root in paths:
        for dirpath, _, files in os.walk(root):
            for name in files:
                st = os.stat(os.path.join(dirpath, name))
                apparent += st.st_size
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    unique += st.st_size
    return {"bytes_on_disk": unique, "bytes_if_copied": apparent}
