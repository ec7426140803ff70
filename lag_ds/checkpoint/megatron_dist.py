"""Grow a megatron-core ``dist_checkpointing`` checkpoint (``torch_dist`` backend) offline.

Why: ``torch_dist`` is what Megatron-LM writes by default. It stores *global* tensors (one
PyTorch Distributed Checkpoint key per parameter, chunks written by whichever rank owned them),
and ``TransformerBlock.sharded_state_dict`` stacks the transformer layers along a leading layer
axis: ``decoder.layers.self_attention.linear_qkv.weight`` is ``[L, 3h, h]``. Depth growth
therefore changes *global shapes*: no file can be reused as it is, because every data file holds
rows of many stacked tensors. Either every stacked tensor is rewritten with ``L + k`` rows
(``reuse="rewrite"``, the default), or the new chunk table points back into the source's bytes
(``reuse="link"``, see :func:`_write_by_reference`). Because the stored tensors are global, the
output is independent of TP and DP: megatron-core reshards on load (``dist_checkpointing.load``
with the deeper model's ``sharded_state_dict`` at any TP/DP).

Layout read here (a directory, or a Megatron-LM run directory whose
``latest_checkpointed_iteration.txt`` names ``iter_NNNNNNN``)::

    metadata.json       {"sharded_backend": "torch_dist", ...}   copied
    common.pt           non-sharded state; ``args.num_layers`` updated when present
    .metadata           DCP metadata (global shapes, chunk -> file offsets)   rewritten
    __R_I.distcp        tensor and object bytes            rewritten (one file per item) or linked

Keys (the layer table of this format, :data:`STACKED`): ``{prefix}decoder.layers.{suffix}``
whose leading dimension is the layer count is a stacked layer tensor. ``prefix`` is empty for
model parameters and ``optimizer.state.{exp_avg,exp_avg_sq,param,fp32_param}.`` for optimizer
state with the parameters' global shapes (megatron-core's non-distributed optimizers write it;
the distributed optimizer's ``fully_sharded_model_space`` uses the same names, but stores N-D
flattened shards that this module refuses, see below). Per-layer *objects*
(``..._extra_state/shard_{layer}_{L}``) carry the layer count in their key; they are re-keyed
and their bytes copied from the source layer, unpickled never. Everything else is copied.

Each grown layer follows the shared plan executor (:func:`lag_ds.checkpoint.recipes.plan_recipes`):
copies bit for bit, ``zero`` output projections (values and moments), ``random`` layers drawn by
:func:`lag_ds.checkpoint.megatron_layout.random_layer_param` with the grown depth.

Memory: one source tensor (all ``L`` layers of one name) and its grown ``L + k`` counterpart at a
time; the DCP writer asks this module for each tensor when it writes it (:class:`_LazyPlanner`).
Not handled (refused with a one-line error, never grown wrongly): distributed-optimizer state,
whether ``dp_reshardable`` (flat per-DP-rank buffers, no layer structure) or N-D flattened
``fully_sharded_model_space`` shards (``mcore_data`` in ``.metadata``); megatron-core's
DistributedOptimizer needs CUDA, so no such checkpoint could be made on this CPU machine.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lag_ds.checkpoint.atomic import AtomicDirectory
from lag_ds.checkpoint.formats import CheckpointInfo, check_destination, progress_bar
from lag_ds.checkpoint.layer_tables import TABLES
from lag_ds.checkpoint.manifest import write_manifest
from lag_ds.checkpoint.megatron_layout import TpRule, random_layer_param
from lag_ds.checkpoint.recipes import TensorKey, TensorRecipe, plan_recipes
from lag_ds.growth import GrowthPlan

__all__ = ["FORMAT_NAME", "STACKED", "TorchDistCheckpoint", "grow_torch_dist_checkpoint",
           "is_torch_dist", "resolve_torch_dist_dir"]

FORMAT_NAME = "megatron-torch-dist"
MANIFEST_KIND = FORMAT_NAME
TRACKER = "latest_checkpointed_iteration.txt"
STACKED = re.compile(r"^(?P<prefix>(?:optimizer\.state\.[A-Za-z0-9_]+\.)?)decoder\.layers\."
                     r"(?P<suffix>[^/]+)$")
"""A (possibly optimizer-prefixed) stacked layer tensor key."""
LAYER_OBJECT = re.compile(r"^(?P<base>(?:.*\.)?decoder\.layers\.[^/]+)/shard_(?P<layer>\d+)_"
                          r"(?P<count>\d+)$")
"""A per-layer ShardedObject (``_extra_state``): megatron keys it by layer index and count."""
VALUE_PREFIXES = ("", "optimizer.state.param.", "optimizer.state.fp32_param.")
"""Stacked values: the model's, the distributed optimizer's main param
(``fully_sharded_model_space``) and the float16 optimizer's fp32 copy."""
MOMENT_PREFIXES = ("optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq.")
_TABLE = TABLES["megatron-core-gpt"]


def resolve_torch_dist_dir(path: Path) -> Path | None:
    """The directory holding ``metadata.json`` + ``.metadata`` (``path`` itself or the iteration
    its Megatron-LM tracker names); None when ``path`` is not a torch_dist checkpoint."""
    path = Path(path)
    if not path.is_dir():
        return None
    tracker = path / TRACKER
    if tracker.is_file() and not (path / "metadata.json").exists():
        text = tracker.read_text(errors="replace").strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else ""
        path = path / name if name else path
    meta = path / "metadata.json"
    if not (meta.is_file() and (path / ".metadata").is_file()):
        return None
    try:
        backend = json.loads(meta.read_text()).get("sharded_backend")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return path if backend == "torch_dist" else None


def is_torch_dist(path: Path) -> bool:
    return resolve_torch_dist_dir(path) is not None


@dataclass(frozen=True)
class _Stacked:
    key: str
    prefix: str
    suffix: str


class TorchDistCheckpoint:
    """Metadata of a torch_dist checkpoint and one global tensor at a time on demand.

    Implements :class:`lag_ds.checkpoint.formats.CheckpointReader` with megatron's own names
    (stacked keys appear as ``decoder.layers.{i}.{suffix}`` per layer)."""

    format, family = FORMAT_NAME, "megatron-core-gpt"

    def __init__(self, path: Path, *, unsafe_load: bool = False) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            TensorStorageMetadata,
        )

        resolved = resolve_torch_dist_dir(Path(path))
        if resolved is None:
            raise ValueError(f"{path}: not a megatron-core torch_dist checkpoint "
                             "(metadata.json with sharded_backend torch_dist, and .metadata)")
        self.path, self.unsafe_load = resolved, unsafe_load
        try:
            self.metadata = FileSystemReader(str(resolved)).read_metadata()
        except Exception as exc:  # truncated / corrupt pickle
            raise ValueError(f"{resolved / '.metadata'}: cannot be read ({type(exc).__name__}: "
                             f"{str(exc)[:120]})") from None
        if getattr(self.metadata, "mcore_data", None):
            raise ValueError(f"{resolved / '.metadata'}: holds N-D flattened tensors (mcore_data: "
                             "the distributed optimizer's flat shards); growing them is not "
                             "supported")
        self.tensors: dict[str, TensorStorageMetadata] = {}
        self.objects: list[str] = []
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                self.tensors[key] = md
            elif isinstance(md, BytesStorageMetadata):
                self.objects.append(key)
        self.stacked: dict[str, _Stacked] = {}
        depths = {}
        for key, md in self.tensors.items():
            if m := STACKED.match(key):
                self.stacked[key] = _Stacked(key, m.group("prefix"), m.group("suffix"))
                depths[key] = md.size[0] if len(md.size) else None
        if not self.stacked:
            raise ValueError(f"{resolved}: no decoder.layers.* tensors (not a megatron-core GPT "
                             "checkpoint, or one saved without stacked layers)")
        found = set(depths.values())
        if len(found) != 1 or None in found:
            odd = sorted(depths.items(), key=lambda kv: str(kv[1]))[:2]
            raise ValueError(f"{resolved}: stacked layer tensors disagree on the layer count {odd}")
        self.num_layers = found.pop()
        for key in self.objects:
            m = LAYER_OBJECT.match(key)
            if m and int(m.group("count")) != self.num_layers:
                raise ValueError(f"{resolved}: object {key} says {m.group('count')} layers, the "
                                 f"stacked tensors {self.num_layers}")
        flat = [k for k in self.tensors if "optimizer" in k and k not in self.stacked
                and "decoder.layers" in k]
        bad_prefix = sorted({s.prefix for s in self.stacked.values()}
                            - set(VALUE_PREFIXES) - set(MOMENT_PREFIXES))
        if flat or bad_prefix:
            raise ValueError(f"{resolved}: optimizer state {(flat or bad_prefix)[0]!r} is not in "
                             "the model's layer layout (the distributed optimizer's dp_reshardable "
                             "format cannot be grown; save with fully_sharded_model_space)")
        self.global_steps = self._iteration()

    def _iteration(self) -> int:
        m = re.fullmatch(r"iter_(\d+)", self.path.name)
        return int(m.group(1)) if m else 0

    # -------------------------------------------------------------- CheckpointReader
    def param_names(self) -> list[str]:
        names = []
        for key in self.tensors:
            st = self.stacked.get(key)
            if st is None:
                if not key.startswith("optimizer."):
                    names.append(key)
            elif st.prefix == "":
                names += [_TABLE.layer_name(i, st.suffix) for i in range(self.num_layers)]
        return names

    def full_shape(self, name: str) -> tuple[int, ...]:
        split = _TABLE.split_layer_name(name)
        if split is not None:
            return tuple(self.tensors[f"decoder.layers.{split[1]}"].size[1:])
        return tuple(self.tensors[name].size)

    def tp_rule(self, name: str) -> TpRule:
        return _TABLE.tp_rule(_TABLE.split_layer_name(name)[1] if _TABLE.split_layer_name(name)
                              else name)

    def value(self, name: str, key: str = "fp32") -> torch.Tensor:
        prefix = "" if key == "fp32" else f"optimizer.state.{key}."
        split = _TABLE.split_layer_name(name)
        if split is not None:
            return self.read(f"{prefix}decoder.layers.{split[1]}")[split[0]]
        return self.read(prefix + name)

    # -------------------------------------------------------------- raw access
    def read(self, key: str) -> torch.Tensor:
        """One global tensor, assembled by DCP from whatever chunks the ranks wrote."""
        from torch.distributed.checkpoint import FileSystemReader, load

        md = self.tensors[key]
        out = {key: torch.empty(md.size, dtype=md.properties.dtype)}
        try:
            with _single_process():
                load(out, storage_reader=FileSystemReader(str(self.path)), no_dist=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise ValueError(f"{self.path}: tensor {key} cannot be read ({type(exc).__name__}: "
                             f"{first})") from None
        return out[key]

    def object_bytes(self, key: str) -> bytes:
        """The stored bytes of one object, exactly as written (never unpickled here)."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.metadata.storage_data[MetadataIndex(key)]
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{self.path}: object {key} is stored with transforms "
                             f"{info.transform_descriptors} (not supported)")
        path = self.path / info.relative_path
        with open(path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        if len(data) != info.length:
            raise ValueError(f"{path}: truncated ({key} needs bytes {info.offset}..+{info.length})")
        return data

    def info(self) -> CheckpointInfo:
        return CheckpointInfo(FORMAT_NAME, self.path, self.num_layers, self.global_steps,
                              self.family)


# ------------------------------------------------------------------ growing
class _LazyPlanner:
    """A DCP save planner whose tensors are produced when the writer asks for them.

    Why: DCP plans from tensor *shapes* (meta tensors here) and later calls ``resolve_data`` once
    per item while streaming it to the file (``_SerialCpuLoader``), so only one grown tensor is
    in memory at a time. Object items return their source bytes verbatim instead of re-pickling."""

    def __new__(cls, producers: dict[str, Any], raw: dict[str, bytes]):
        from torch.distributed.checkpoint import DefaultSavePlanner
        from torch.distributed.checkpoint.planner import WriteItemType

        class Planner(DefaultSavePlanner):
            def resolve_data(self, write_item):  # noqa: D401 - DCP hook
                fqn = write_item.index.fqn
                if write_item.type == WriteItemType.BYTE_IO:
                    return io.BytesIO(raw[fqn])
                return producers[fqn]()

        return Planner(flatten_state_dict=False, flatten_sharded_tensors=False)


def grow_torch_dist_checkpoint(src: Path, dst: Path, plan: GrowthPlan, *,
                               show_progress: bool = True, optimizer_state: str = "copy",
                               init_std: float = 0.02, unsafe_load: bool = False,
                               reuse: str = "rewrite") -> dict[str, Any]:
    """Write ``dst``: the torch_dist checkpoint ``src`` grown by ``plan``; returns the manifest.

    ``src`` is a torch_dist directory or a Megatron-LM run directory with a tracker file (then
    ``dst`` gets the same tracker and iteration directory). Everything is validated before
    anything is written; ``dst`` appears only when complete (``AtomicDirectory``).

    ``reuse="rewrite"`` (the CLI's) writes a self-contained checkpoint through DCP.
    ``reuse="link"`` hard-links the source's ``.distcp`` files into ``dst`` and writes a new
    ``.metadata`` whose chunk table points every copied layer row (and every unchanged tensor and
    object) at the bytes already stored there; only rows that are not copies (zero / random
    values, zeroed moments) are written, to one new file (:func:`_write_by_reference`). It needs
    a source whose stacked tensors are stored one layer per chunk (megatron's own saves are) and
    the same filesystem; it raises ``ValueError`` otherwise, writing nothing."""
    if reuse not in ("rewrite", "link"):
        raise ValueError(f"reuse must be 'rewrite' or 'link', got {reuse!r}")
    from torch.distributed.checkpoint import FileSystemWriter, save

    if plan is None:
        raise ValueError("--op is required for a torch_dist checkpoint (it holds global tensors "
                         "and loads at any TP/DP without resharding)")
    src, dst = Path(src), Path(dst)
    check_destination(dst)
    ck = TorchDistCheckpoint(src, unsafe_load=unsafe_load)
    if plan.old_num_layers != ck.num_layers:
        raise ValueError(f"--op is planned for {plan.old_num_layers} layers but {ck.path} holds "
                         f"{ck.num_layers} (leading axis of decoder.layers.*)")
    suffixes = sorted({s.suffix for s in ck.stacked.values()})
    keys = ([TensorKey(None, "<outside>")]
            + [TensorKey(i, s) for i in range(ck.num_layers) for s in suffixes])
    recipes = plan_recipes(keys, plan, is_output_projection=_TABLE.is_output_projection,
                           optimizer_state=optimizer_state)
    by_suffix: dict[str, list[TensorRecipe]] = {}
    for r in recipes:
        if r.dst.layer is not None:
            by_suffix.setdefault(r.dst.name, []).append(r)
    common = _grown_common(ck, plan, unsafe_load=unsafe_load)

    new_layers = plan.new_num_layers
    state: dict[str, Any] = {}
    producers: dict[str, Any] = {}
    raw: dict[str, bytes] = {}
    for key, md in ck.tensors.items():
        st = ck.stacked.get(key)
        shape = (new_layers, *md.size[1:]) if st else tuple(md.size)
        state[key] = torch.empty(shape, dtype=md.properties.dtype, device="meta")
        producers[key] = (_stacked_producer(ck, st, by_suffix[st.suffix], init_std, new_layers)
                          if st else _copy_producer(ck, key))
    for key in ck.objects:
        m = LAYER_OBJECT.match(key)
        if m is None:
            state[key], raw[key] = None, ck.object_bytes(key)
            continue
        if int(m.group("layer")) != 0:
            continue
        for source in plan.layers:
            new_key = f"{m.group('base')}/shard_{source.new_index}_{new_layers}"
            old_key = f"{m.group('base')}/shard_{source.old_index}_{ck.num_layers}"
            state[new_key], raw[new_key] = None, ck.object_bytes(old_key)

    tag = ck.path.name if ck.path != src else None
    started = time.perf_counter()
    bar = progress_bar(show_progress, total=len(producers), desc=f"growing {ck.path.name}")
    counted = {k: _counted(p, bar) for k, p in producers.items()}
    if reuse == "link":
        _check_per_layer_chunks(ck)
    with AtomicDirectory(dst) as tmp:
        out = tmp / tag if tag else tmp
        out.mkdir(exist_ok=True)
        if reuse == "link":
            linked = _write_by_reference(ck, out, state, by_suffix, init_std, new_layers, plan)
        else:
            with _single_process():
                # one file per item: DCP keeps every tensor of a file alive until the file is
                # closed (tensor_dict in _write_files_from_queue), so one file would hold the
                # whole grown checkpoint in memory
                writer = FileSystemWriter(str(out), thread_count=1, single_file_per_rank=False)
                save(state, storage_writer=writer,
                     planner=_LazyPlanner(counted, raw), no_dist=True)
        bar.close()
        shutil.copyfile(ck.path / "metadata.json", out / "metadata.json")
        if common is None:
            shutil.copyfile(ck.path / "common.pt", out / "common.pt")
        else:
            torch.save(common, out / "common.pt")
        if tag:
            (tmp / TRACKER).write_text((src / TRACKER).read_text())
        manifest = write_manifest(
            tmp, kind=MANIFEST_KIND,
            source={"path": str(src), "num_layers": ck.num_layers, "step": ck.global_steps},
            plan=plan.to_dict(),
            extra={"format": FORMAT_NAME, "new_num_layers": new_layers, "tag": tag,
                   "stacked_tensors": len(ck.stacked),
                   "copied_tensors": len(ck.tensors) - len(ck.stacked),
                   "objects": len(raw), "optimizer_state": optimizer_state,
                   "init_std": init_std, "write_seconds": round(time.perf_counter() - started, 3),
                   "loads_at": "any TP/DP (global tensors; megatron-core reshards on load)",
                   "reuse": reuse, "hard_linked_files": linked if reuse == "link" else []})
    return manifest


def _check_per_layer_chunks(ck: TorchDistCheckpoint) -> None:
    """Referencing copies layer rows by chunk: every stored chunk of a stacked tensor must hold
    exactly one layer (megatron writes one chunk per layer and TP shard)."""
    for key in ck.stacked:
        for chunk in ck.tensors[key].chunks:
            if chunk.sizes[0] != 1:
                raise ValueError(f"{ck.path}: {key} has a chunk spanning layers "
                                 f"{chunk.offsets[0]}..+{chunk.sizes[0]}; reuse='link' needs one "
                                 "layer per chunk (use reuse='rewrite')")


def _write_by_reference(ck: TorchDistCheckpoint, out: Path, state: dict[str, Any],
                        by_suffix: dict[str, list[TensorRecipe]], init_std: float,
                        new_layers: int, plan: GrowthPlan) -> list[str]:
    """Hard-link the source's data files and write a chunk table that points into them.

    Why: a DCP ``.metadata`` maps every (key, chunk offset) to (file, byte offset, length); the
    bytes of a copied layer row are already on disk, so the grown table can name them again
    (twice for a duplicated layer). Rows whose value is not a copy are serialised exactly as DCP's
    own writer does (``torch.save`` of the chunk at a file offset) into ``__lag_grown.distcp``.
    Files are never modified in place by DCP or megatron, so sharing inodes is safe for them;
    an editor that rewrote a source file in place would change the grown checkpoint too."""
    import copy
    import os
    import pickle

    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    src_md = ck.metadata
    files = sorted({info.relative_path for info in src_md.storage_data.values()})
    for name in files:
        if "/" in name or name in ("", ".", "..", ".metadata"):
            raise ValueError(f"{ck.path / '.metadata'}: storage file name {name!r} is not a file "
                             "of the checkpoint directory")
        try:
            os.link(ck.path / name, out / name)
        except OSError as exc:
            raise ValueError(f"cannot hard-link {ck.path / name} into {out} ({exc.strerror}); "
                             "use reuse='rewrite'") from None
    chunks_of: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in src_md.storage_data.items():
        chunks_of.setdefault(index.fqn, []).append((index, info))
    new_md: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    new_file = "__lag_grown.distcp"
    with open(out / new_file, "wb") as fresh:
        for key, md in ck.tensors.items():
            st = ck.stacked.get(key)
            if st is None:  # unchanged tensor: same chunks, same bytes
                new_md[key] = md
                for index, info in chunks_of[key]:
                    storage[index] = info
                continue
            moment = st.prefix in MOMENT_PREFIXES
            chunks = []
            for r in by_suffix[st.suffix]:
                rule = r.moments if moment else r.value
                if rule == "copy":
                    for index, info in chunks_of[key]:
                        if index.offset[0] == r.src.layer:
                            offset = torch.Size((r.dst.layer, *index.offset[1:]))
                            size = next(c.sizes for c in md.chunks if c.offsets == index.offset)
                            chunks.append(ChunkStorageMetadata(offset, size))
                            storage[MetadataIndex(key, offset)] = info
                    continue
                shape = tuple(md.size[1:])
                if rule == "zero":
                    row = torch.zeros((1, *shape), dtype=md.properties.dtype)
                else:
                    row = random_layer_param(st.suffix, shape, std=init_std,
                                             num_layers=new_layers, seed=r.seed)
                    row = row.to(md.properties.dtype).unsqueeze(0)
                offset = torch.Size((r.dst.layer, *[0] * len(shape)))
                start = fresh.tell()
                torch.save(row.contiguous().clone(), fresh)
                chunks.append(ChunkStorageMetadata(offset, torch.Size(row.shape)))
                storage[MetadataIndex(key, offset)] = type(chunks_of[key][0][1])(
                    relative_path=new_file, offset=start, length=fresh.tell() - start)
            new_md[key] = TensorStorageMetadata(copy.deepcopy(md.properties),
                                                torch.Size((new_layers, *md.size[1:])), chunks)
        for key in state:
            if key in ck.tensors:
                continue
            m = LAYER_OBJECT.match(key)
            old_key = key
            if m is not None:
                layer = plan.layers[int(m.group("layer"))]
                old_key = f"{m.group('base')}/shard_{layer.old_index}_{ck.num_layers}"
            new_md[key] = BytesStorageMetadata()
            storage[MetadataIndex(key)] = src_md.storage_data[MetadataIndex(old_key)]
    metadata = Metadata(state_dict_metadata=new_md, planner_data=None, storage_data=storage,
                        version=getattr(src_md, "version", None))
    with open(out / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return files


@contextmanager
def _single_process():
    """DCP warns on every ``no_dist`` call that it assumes one process; here that is the point."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _counted(produce, bar):
    def run():
        value = produce()
        bar.update(1)
        return value
    return run


def _copy_producer(ck: TorchDistCheckpoint, key: str):
    return lambda: ck.read(key)


def _stacked_producer(ck: TorchDistCheckpoint, st: _Stacked, recipes: list[TensorRecipe],
                      init_std: float, new_layers: int):
    """The grown ``[L + k, ...]`` tensor of one stacked key, row by row from its recipes."""
    moment = st.prefix in MOMENT_PREFIXES

    def produce() -> torch.Tensor:
        source = ck.read(st.key)
        out = torch.empty((new_layers, *source.shape[1:]), dtype=source.dtype)
        for r in recipes:
            rule = r.moments if moment else r.value
            if rule == "copy":
                out[r.dst.layer] = source[r.src.layer]
            elif rule == "zero":
                out[r.dst.layer].zero_()
            else:
                out[r.dst.layer] = random_layer_param(st.suffix, tuple(source.shape[1:]),
                                                      std=init_std, num_layers=new_layers,
                                                      seed=r.seed).to(source.dtype)
        return out
    return produce


def _grown_common(ck: TorchDistCheckpoint, plan: GrowthPlan, *, unsafe_load: bool):
    """``common.pt`` with ``args.num_layers`` set to the grown depth, or None to copy it as is.

    Why: Megatron-LM stores its argparse namespace there and checks ``num_layers`` on load; a
    bare ``dist_checkpointing.save`` of a model writes ``{}``."""
    import argparse

    path = ck.path / "common.pt"
    if not path.is_file():
        raise ValueError(f"{path}: missing (megatron-core writes it with every torch_dist save)")
    try:
        if unsafe_load:
            common = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                common = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only" in first or "Unsupported global" in str(exc):
            raise ValueError(f"{path}: refused by weights-only loading; pass --unsafe-load only "
                             "if you trust this file") from None
        raise ValueError(f"{path}: cannot be read (truncated or corrupt?): {first[:160]}") from None
    args = common.get("args") if isinstance(common, dict) else None
    if args is None or not hasattr(args, "num_layers"):
        return None
    if args.num_layers != ck.num_layers:
        raise ValueError(f"{path}: args.num_layers={args.num_layers} but the stacked tensors "
                         f"hold {ck.num_layers} layers")
    args.num_layers = plan.new_num_layers
    return common
