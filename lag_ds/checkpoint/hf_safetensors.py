"""Execute a ``GrowthPlan`` on a Hugging Face safetensors checkpoint directory, streaming.

Why: the LAG candidates (paper section 2.1) are grown from one pretrained checkpoint; for models
published on the Hub that checkpoint is a directory of safetensors shards. This adapter maps the
plan's layer indices onto the architecture's parameter names and writes a new, complete HF
directory (``from_pretrained`` loads it) with a lag_ds manifest, never loading the whole model.

Supported layouts (one key-template table per architecture, ``ARCHITECTURES``):

* Llama-style (``llama``, ``mistral``, ``qwen2``): ``model.layers.{layer}.<name>``,
  layer count ``num_hidden_layers``; output projections ``self_attn.o_proj`` / ``mlp.down_proj``.
* GPT-2-style (``gpt2``): ``transformer.h.{layer}.<name>``, layer count ``n_layer``; output
  projections ``attn.c_proj`` / ``mlp.c_proj``.

Layer ``j`` of the grown model is built from ``plan.layers[j]``: ``copy_from`` -> that old layer's
tensors, bit-identical; ``random`` / ``zero-random`` -> one decoder layer built from the *grown*
config (L+k layers, which matters for GPT-2's depth-scaled ``c_proj`` init) under
``torch.manual_seed(LayerSource.seed)`` and initialised with the model class's own
``_init_weights`` applied children-first (as ``PreTrainedModel.initialize_weights`` does), then cast
to the checkpoint's dtype; ``zero_output_projections`` -> the output projection weights and biases
are zeros, so the block is an identity residual block. Non-layer tensors are copied unchanged (a
tied ``lm_head`` stays absent). ``config.json`` gets the new layer count and per-layer lists
(``layer_types``, ...) re-indexed by the plan; other non-weight files (tokenizer, generation config)
are copied.

Everything is validated before anything is written (missing / truncated shards, index naming
absent tensors, layer counts), the output goes through ``AtomicDirectory`` (absent or complete) and
the manifest (kind ``hf-safetensors``) is written last. Memory: one source tensor at a time plus
the current output shard's buffer (at most ``max_shard_bytes``), plus one decoder layer while a
random layer is emitted.

Example::

    plan = plan_growth(parse_operator("k=4,i0=8,b=4,init=duplicate"), 12, seed=0)
    manifest = grow_hf_checkpoint(Path("ckpt/small"), Path("ckpt/grown"), plan)
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lag_ds.checkpoint.atomic import AtomicDirectory, check_free_space, stored_size
from lag_ds.checkpoint.formats import check_destination, progress_bar
from lag_ds.checkpoint.manifest import MANIFEST_NAME, write_manifest
from lag_ds.faults import fault_point
from lag_ds.growth.plan import GrowthPlan, LayerSource

__all__ = [
    "ARCHITECTURES",
    "CONFIG_NAME",
    "INDEX_NAME",
    "PER_LAYER_CONFIG_KEYS",
    "SINGLE_FILE_NAME",
    "ArchSpec",
    "grow_hf_checkpoint",
    "is_hf_checkpoint",
]

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
MANIFEST_KIND = "hf-safetensors"

PER_LAYER_CONFIG_KEYS: tuple[str, ...] = ("layer_types", "no_rope_layers")
"""config.json lists with one entry per layer; re-indexed by the plan (entry of ``old_index``)."""

_WEIGHT_FILE_RE = re.compile(
    r"(.*\.safetensors|.*\.safetensors\.index\.json|pytorch_model.*\.bin(\.index\.json)?"
    r"|.*\.(pt|pth|ckpt|h5|msgpack)(\.index\.json)?|model\.ckpt.*)"
)
"""Files in the source that hold (old) weights: never copied, the grown weights replace them."""

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}


@dataclass(frozen=True)
class ArchSpec:
    """Key templates of one architecture family; ``{layer}`` is the decoder layer index."""

    family: str
    layer_template: str
    """Every tensor of decoder layer ``{layer}`` is named ``layer_template.format(layer=i) + name``."""
    num_layers_key: str
    """config.json key holding the layer count."""
    output_projections: tuple[str, ...]
    """Per-layer names zeroed by ``zero_output_projections`` (weights required, biases if present)."""
    modeling_module: str
    """transformers module holding the two classes below (``{model_type}`` is substituted)."""
    pretrained_class: str
    """The ``PreTrainedModel`` subclass whose ``_init_weights`` initialises a random layer."""
    layer_class: str
    """The decoder layer class, constructed as ``cls(config, layer_idx)``."""

    def layer_prefix(self, layer: int) -> str:
        return self.layer_template.format(layer=layer)

    def layer_regex(self) -> re.Pattern[str]:
        head, tail = self.layer_template.split("{layer}")
        return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + r"(.+)")


def _llama_style(model_type: str, prefix: str) -> ArchSpec:
    return ArchSpec(
        family="llama",
        layer_template="model.layers.{layer}.",
        num_layers_key="num_hidden_layers",
        output_projections=(
            "self_attn.o_proj.weight", "self_attn.o_proj.bias",
            "mlp.down_proj.weight", "mlp.down_proj.bias",
        ),
        modeling_module=f"transformers.models.{model_type}.modeling_{model_type}",
        pretrained_class=f"{prefix}PreTrainedModel",
        layer_class=f"{prefix}DecoderLayer",
    )


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _llama_style("llama", "Llama"),
    "mistral": _llama_style("mistral", "Mistral"),
    "qwen2": _llama_style("qwen2", "Qwen2"),
    "gpt2": ArchSpec(
        family="gpt2",
        layer_template="transformer.h.{layer}.",
        num_layers_key="n_layer",
        output_projections=("attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"),
        modeling_module="transformers.models.gpt2.modeling_gpt2",
        pretrained_class="GPT2PreTrainedModel",
        layer_class="GPT2Block",
    ),
}
"""model_type -> key templates. ``architectures`` names map onto these via ``_ARCH_CLASS_PREFIX``."""

_ARCH_CLASS_PREFIX = {"LlamaFor": "llama", "MistralFor": "mistral", "Qwen2For": "qwen2", "GPT2": "gpt2"}


def is_hf_checkpoint(path: Path) -> bool:
    """True if ``path`` looks like an HF safetensors checkpoint directory (config + weights)."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and (
        (path / INDEX_NAME).is_file() or (path / SINGLE_FILE_NAME).is_file()
    )


# --------------------------------------------------------------------------------------------
# Reading and validating the source
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorInfo:
    shard: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class _OutEntry:
    """One tensor of the grown checkpoint and how to produce it."""

    key: str
    info: _TensorInfo
    """Shape/dtype of the output; ``info.shard`` is the *source* shard when copying."""
    source_key: str | None
    """Tensor copied from the source; None for zeros or random init."""
    layer: LayerSource | None = None
    suffix: str | None = None
    zero: bool = False


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: corrupt JSON ({exc})") from None


def _detect_arch(config: dict[str, Any], config_path: Path) -> tuple[str, ArchSpec]:
    model_type = config.get("model_type")
    if model_type in ARCHITECTURES:
        return model_type, ARCHITECTURES[model_type]
    if model_type is None:
        for name in config.get("architectures") or ():
            for prefix, arch in _ARCH_CLASS_PREFIX.items():
                if str(name).startswith(prefix):
                    return arch, ARCHITECTURES[arch]
    raise ValueError(
        f"{config_path}: unsupported model_type={model_type!r} "
        f"(architectures={config.get('architectures')!r}); supported: {sorted(ARCHITECTURES)}"
    )


def _open_shard(path: Path, stack: ExitStack) -> Any:
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"{path}: missing safetensors shard")
    try:
        return stack.enter_context(safe_open(str(path), framework="pt"))
    except Exception as exc:  # SafetensorError is not exported under a stable name
        raise ValueError(f"{path}: truncated or corrupt safetensors file ({exc})") from None


def _scan_weights(src: Path, stack: ExitStack) -> tuple[dict[str, _TensorInfo], dict[str, Any], str]:
    """key -> info for every tensor, the open shard handles, and the file that lists the weights."""
    index_path = src / INDEX_NAME
    if index_path.is_file():
        index = _read_json(index_path, "weight index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: no 'weight_map' (not a safetensors index)")
        listed = index_path.name
    elif (src / SINGLE_FILE_NAME).is_file():
        weight_map = None
        listed = SINGLE_FILE_NAME
    else:
        raise ValueError(f"{src}: no {INDEX_NAME} or {SINGLE_FILE_NAME} (not an HF safetensors checkpoint)")

    shards = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE_NAME]
    handles: dict[str, Any] = {}
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise ValueError(f"{index_path}: shard name {shard!r} is not a file name in {src}")
        handles[shard] = _open_shard(src / shard, stack)

    if weight_map is None:
        weight_map = {key: SINGLE_FILE_NAME for key in handles[SINGLE_FILE_NAME].keys()}
    present = {shard: set(handle.keys()) for shard, handle in handles.items()}
    infos: dict[str, _TensorInfo] = {}
    for key, shard in weight_map.items():
        if key not in present[shard]:
            raise ValueError(f"{index_path}: tensor {key!r} is listed in {shard} but absent from {src / shard}")
        tensor_slice = handles[shard].get_slice(key)
        dtype = tensor_slice.get_dtype()
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"{src / shard}: tensor {key!r} has unsupported dtype {dtype}")
        infos[key] = _TensorInfo(shard=shard, shape=tuple(tensor_slice.get_shape()), dtype=dtype)
    return infos, handles, listed


def _split_layers(
    infos: dict[str, _TensorInfo], arch: ArchSpec, num_layers: int, listed: str, config_key: str
) -> tuple[list[str], list[str]]:
    """(non-layer keys, per-layer suffixes in order), checking layers 0..L-1 all have the same tensors."""
    pattern = arch.layer_regex()
    non_layer: list[str] = []
    suffixes: dict[int, set[str]] = {}
    for key in infos:
        match = pattern.fullmatch(key)
        if match is None:
            non_layer.append(key)
        else:
            suffixes.setdefault(int(match.group(1)), set()).add(match.group(2))
    found = sorted(suffixes)
    if found != list(range(num_layers)):
        raise ValueError(
            f"{listed}: weights hold decoder layers {_ranges(found)} ({len(found)} layers) "
            f"but {CONFIG_NAME} {config_key}={num_layers}"
        )
    reference = suffixes[0] if num_layers else set()
    for layer, names in suffixes.items():
        if names != reference:
            diff = sorted(names ^ reference)
            raise ValueError(f"{listed}: layer {layer} has different tensors than layer 0 ({diff[:4]})")
    for layer in range(num_layers):  # same shapes/dtypes too, or copying would break the model
        for suffix in reference:
            a, b = infos[arch.layer_prefix(0) + suffix], infos[arch.layer_prefix(layer) + suffix]
            if (a.shape, a.dtype) != (b.shape, b.dtype):
                raise ValueError(f"{listed}: layer {layer} {suffix} is {b.shape} {b.dtype}, layer 0 has {a.shape} {a.dtype}")
    return non_layer, sorted(reference)


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    return f"{values[0]}..{values[-1]}" if values == list(range(values[0], values[-1] + 1)) else str(values)


def _grown_config(config: dict[str, Any], arch: ArchSpec, plan: GrowthPlan, config_path: Path) -> dict[str, Any]:
    new = dict(config)
    new[arch.num_layers_key] = plan.new_num_layers
    for key in PER_LAYER_CONFIG_KEYS:
        values = config.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != plan.old_num_layers:
            raise ValueError(
                f"{config_path}: {key} must be a list of {plan.old_num_layers} per-layer entries, got {values!r}"
            )
        new[key] = [values[layer.old_index] for layer in plan.layers]
    return new


# --------------------------------------------------------------------------------------------
# Random layers: the model's own initialiser, seeded per layer
# --------------------------------------------------------------------------------------------


class _RandomLayerFactory:
    """Builds decoder layers of the grown model with the model class's own ``_init_weights``."""

    def __init__(self, model_type: str, arch: ArchSpec, grown_config: dict[str, Any]) -> None:
        from transformers import CONFIG_MAPPING

        module = importlib.import_module(arch.modeling_module)
        self.layer_cls = getattr(module, arch.layer_class)
        pretrained_cls = getattr(module, arch.pretrained_class)
        config_dict = {k: v for k, v in grown_config.items() if k not in ("model_type", "transformers_version")}
        self.config = CONFIG_MAPPING[model_type].from_dict(config_dict)
        # A bare PreTrainedModel subclass (no submodules): only provides ``_init_weights`` + config.
        self.initialiser = pretrained_cls(self.config)

    def shapes(self, layer_idx: int) -> dict[str, tuple[int, ...]]:
        """Parameter shapes of one layer, built on the meta device (no memory, no RNG)."""
        import torch

        with torch.device("meta"):
            layer = self.layer_cls(self.config, layer_idx)
        return {name: tuple(t.shape) for name, t in layer.state_dict().items()}

    def build(self, layer_idx: int, seed: int) -> dict[str, Any]:
        """state_dict of layer ``layer_idx`` drawn with ``seed`` (global torch RNG left untouched)."""
        import torch
        from transformers import initialization

        with torch.random.fork_rng(devices=[]), torch.no_grad(), initialization.guard_torch_init_functions():
            torch.manual_seed(seed)
            layer = self.layer_cls(self.config, layer_idx)
            _post_order(layer, self.initialiser._init_weights)
        return {name: t.detach() for name, t in layer.state_dict().items()}


def _post_order(module: Any, fn: Any) -> None:
    """``fn`` on every submodule, children before parents (``PreTrainedModel.initialize_weights``'s order)."""
    for child in module.children():
        _post_order(child, fn)
    fn(module)


# --------------------------------------------------------------------------------------------
# Growing
# --------------------------------------------------------------------------------------------


def _plan_entries(
    infos: dict[str, _TensorInfo], arch: ArchSpec, non_layer: list[str], suffixes: list[str], plan: GrowthPlan
) -> list[_OutEntry]:
    entries = [_OutEntry(key=key, info=infos[key], source_key=key) for key in sorted(non_layer)]
    zeroed = set(arch.output_projections)
    for layer in plan.layers:
        for suffix in suffixes:
            src_key = arch.layer_prefix(layer.old_index) + suffix
            out_key = arch.layer_prefix(layer.new_index) + suffix
            zero = layer.zero_output_projections and suffix in zeroed
            copy = layer.copy_from is not None and not zero
            entries.append(
                _OutEntry(
                    key=out_key,
                    info=infos[src_key],
                    source_key=arch.layer_prefix(layer.copy_from) + suffix if copy else None,
                    layer=layer,
                    suffix=suffix,
                    zero=zero,
                )
            )
    return entries


def _assign_shards(entries: list[_OutEntry], max_shard_bytes: int) -> list[list[_OutEntry]]:
    """Greedy, in order; a tensor larger than ``max_shard_bytes`` gets a shard of its own."""
    shards: list[list[_OutEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.info.nbytes
    return [shard for shard in shards if shard]


def _torch_dtype(name: str) -> Any:
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None), "BOOL": torch.bool,
    }[name]


@contextmanager
def _progress(total: int, desc: str, unit: str, enabled: bool) -> Iterator[Any]:
    bar = progress_bar(enabled, total=total, desc=desc, unit=unit)
    try:
        yield bar
    finally:
        bar.close()


def grow_hf_checkpoint(
    src: Path,
    dst: Path,
    plan: GrowthPlan,
    *,
    max_shard_bytes: int = 2 << 30,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write ``dst``: the HF checkpoint ``src`` grown by ``plan``; returns the manifest.

    Raises a one-line ``ValueError`` naming the file or argument, before writing anything, for: an
    unsupported model_type, a config layer count != ``plan.old_num_layers``, weights holding another
    number of layers, a missing / truncated / corrupt shard, an index naming a tensor absent from
    its shard, an existing ``dst``. ``src`` is only read.
    """
    src, dst = Path(src), Path(dst)
    if not isinstance(plan, GrowthPlan):
        raise ValueError(f"plan must be a GrowthPlan, got {type(plan).__name__}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    if not src.is_dir():
        raise ValueError(f"source checkpoint directory does not exist: {src}")
    check_destination(dst)
    src_real, dst_real = src.resolve(), dst.resolve()
    if dst_real == src_real or src_real in dst_real.parents:
        raise ValueError(f"destination {dst} is inside the source {src} (the source is never modified)")

    config_path = src / CONFIG_NAME
    config = _read_json(config_path, "model config")
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a JSON object")
    model_type, arch = _detect_arch(config, config_path)
    num_layers = config.get(arch.num_layers_key)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise ValueError(f"{config_path}: no integer {arch.num_layers_key} (got {num_layers!r})")
    if num_layers != plan.old_num_layers:
        raise ValueError(
            f"{config_path}: {arch.num_layers_key}={num_layers} but the plan {plan.name} grows a "
            f"{plan.old_num_layers}-layer model (plan.old_num_layers={plan.old_num_layers})"
        )
    grown_config = _grown_config(config, arch, plan, config_path)

    with ExitStack() as stack:
        infos, handles, listed = _scan_weights(src, stack)
        non_layer, suffixes = _split_layers(infos, arch, num_layers, listed, arch.num_layers_key)
        if any(layer.zero_output_projections for layer in plan.layers):
            for name in arch.output_projections:
                if name.endswith(".weight") and name not in suffixes:
                    raise ValueError(f"{listed}: no {arch.layer_prefix(0)}{name} to zero for plan {plan.name}")
        factory = None
        if any(layer.copy_from is None for layer in plan.layers):
            factory = _RandomLayerFactory(model_type, arch, grown_config)
            shapes = factory.shapes(plan.new_layers()[0].new_index)
            for suffix in suffixes:
                want = infos[arch.layer_prefix(0) + suffix].shape
                if shapes.get(suffix) != want:
                    raise ValueError(
                        f"{config_path}: a {arch.layer_class} built from it has {suffix} "
                        f"{shapes.get(suffix, 'absent')}, the weights have {want}"
                    )

        entries = _plan_entries(infos, arch, non_layer, suffixes, plan)
        shards = _assign_shards(entries, max_shard_bytes)
        other_files, skipped = [], []
        for path in sorted(src.iterdir()):
            name = path.name
            if name in (CONFIG_NAME, INDEX_NAME) or name in handles:
                continue  # rewritten / replaced by the grown weights
            if name == MANIFEST_NAME or name.startswith(".") or not path.is_file() or _WEIGHT_FILE_RE.fullmatch(name):
                skipped.append(name)  # old manifest, hidden files, subdirectories, stale weight files
            else:
                other_files.append(path)
        total_bytes = sum(entry.info.nbytes for entry in entries)
        if dst.parent.is_dir():
            shard_bytes = sum(stored_size(sum(e.info.nbytes for e in shard) + 1024 * len(shard))
                              for shard in shards)  # + the JSON header, ~100 B per tensor
            copied = sum(stored_size(p.stat().st_size, overhead=0) for p in other_files)
            check_free_space(dst.parent, shard_bytes + copied + stored_size(1 << 16) * 2,
                             destination=dst)

        with AtomicDirectory(dst) as tmp:
            for path in other_files:
                shutil.copyfile(path, tmp / path.name)
                fault_point("hf.file_copied", tmp)
            (tmp / CONFIG_NAME).write_text(json.dumps(grown_config, indent=2, sort_keys=True) + "\n")
            weight_map = _write_shards(tmp, shards, handles, factory, show_progress, src.name)
            index = {
                "metadata": {
                    "total_size": total_bytes,
                    "total_parameters": sum(entry.info.numel for entry in entries),
                },
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            with _progress(len(other_files) + len(shards) + 2, "hashing", "file", show_progress) as bar:
                manifest = write_manifest(
                    tmp,
                    kind=MANIFEST_KIND,
                    source={"path": str(src), "num_layers": num_layers},
                    plan=plan.to_dict(),
                    extra={
                        "architecture": model_type,
                        "architectures": config.get("architectures"),
                        "family": arch.family,
                        "num_layers_key": arch.num_layers_key,
                        "new_num_layers": plan.new_num_layers,
                        "num_shards": len(shards),
                        "max_shard_bytes": max_shard_bytes,
                        "copied_files": [p.name for p in other_files],
                        "skipped_files": skipped,
                        "random_init": (
                            f"{arch.layer_class}(grown config, layer_idx) under torch.manual_seed(layer seed), "
                            f"{arch.pretrained_class}._init_weights children-first"
                        ),
                    },
                    progress=bar.update,
                )
    return manifest


def _write_shards(
    tmp: Path,
    shards: list[list[_OutEntry]],
    handles: dict[str, Any],
    factory: _RandomLayerFactory | None,
    show_progress: bool,
    desc: str,
) -> dict[str, str]:
    import torch
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    random_layer: tuple[int, dict[str, Any]] | None = None
    with _progress(sum(map(len, shards)), f"growing {desc}", "tensor", show_progress) as bar:
        for number, shard in enumerate(shards, start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            buffer: dict[str, Any] = {}
            read: set[str] = set()
            for entry in shard:
                dtype = _torch_dtype(entry.info.dtype)
                if entry.source_key is not None:
                    tensor = handles[entry.info.shard].get_tensor(entry.source_key)
                    if entry.source_key in read:  # safe_open may hand out the same (mmap) storage twice
                        tensor = tensor.clone()
                    read.add(entry.source_key)
                elif entry.zero:
                    tensor = torch.zeros(entry.info.shape, dtype=dtype)
                else:
                    assert factory is not None and entry.layer is not None and entry.layer.seed is not None
                    if random_layer is None or random_layer[0] != entry.layer.new_index:
                        random_layer = None  # drop the previous layer before building the next
                        random_layer = (entry.layer.new_index, factory.build(entry.layer.new_index, entry.layer.seed))
                    tensor = random_layer[1].pop(entry.suffix).to(dtype=dtype, copy=True).contiguous()
                buffer[entry.key] = tensor
                weight_map[entry.key] = name
                bar.update(1)
            save_file(buffer, str(tmp / name), metadata={"format": "pt"})
            del buffer
            fault_point("hf.shard_written", tmp)
    return weight_map
