"""Export a lag_ds checkpoint as a Hugging Face ``transformers`` model directory, tensor by tensor.

Why: a model trained (and grown) with lag_ds should be usable where people evaluate and serve
models -- ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` and
``AutoTokenizer.from_pretrained(OUT)`` -- without DeepSpeed, megatron or a GPU.

Architecture mapping. A lag_ds model (``lag_ds.model.build``: megatron-core ``GPTModel``, local
layer spec) is a Llama decoder layer (pre-norm RMSNorm, bias-free linears, gated MLP) with
GeGLU (``activation_func=F.gelu``, exact erf GELU: HF ``hidden_act="gelu"``), megatron's RMSNorm
epsilon 1e-5, tied (or untied) output layer -- and **learned absolute position embeddings**,
which no stock ``transformers`` architecture combines with RMSNorm and a gated MLP (GPT-2/OPT/
BLOOM-style models with learned positions use LayerNorm and a plain MLP; Llama-style models use
rotary positions). So the export is Llama's classes plus a position table, shipped as remote code
(``configuration_lagds.py`` / ``modeling_lagds.py`` from :mod:`lag_ds.export.hf_code`, wired up by
``auto_map`` in ``config.json``). Tensor mapping (megatron-core name -> HF name)::

    embedding.word_embeddings.weight        -> model.embed_tokens.weight
    embedding.position_embeddings.weight    -> model.embed_positions.weight
    decoder.layers.{i}.input_layernorm.weight
      (TE spec: self_attention.linear_qkv.layer_norm_weight)
                                            -> model.layers.{i}.input_layernorm.weight
    decoder.layers.{i}.self_attention.linear_qkv.weight
        rows = per query group g: [q heads of g (np/ng x hn), k_g (hn), v_g (hn)]
        (megatron-core SelfAttention.get_query_key_value_tensors)
                                            -> self_attn.{q,k,v}_proj.weight
    decoder.layers.{i}.self_attention.linear_proj.weight -> self_attn.o_proj.weight
    decoder.layers.{i}.pre_mlp_layernorm.weight (TE: mlp.linear_fc1.layer_norm_weight)
                                            -> post_attention_layernorm.weight
    decoder.layers.{i}.mlp.linear_fc1.weight = [gate; up] (megatron MLP: act(chunk 0) * chunk 1)
                                            -> mlp.gate_proj.weight, mlp.up_proj.weight
    decoder.layers.{i}.mlp.linear_fc2.weight -> mlp.down_proj.weight
    decoder.final_layernorm.weight          -> model.norm.weight
    output_layer.weight (untied only)       -> lm_head.weight

Anything else (a linear bias, a LayerNorm bias, rotary-position models without a position table)
is refused with the parameter named, never dropped.

Sources: whatever :func:`lag_ds.checkpoint.formats.read_checkpoint_info` recognises as lag_ds's
own layouts -- native DeepSpeed ZeRO 0/1/2 at any TP x DP (read by
:class:`~lag_ds.checkpoint.deepspeed_source.DeepSpeedCheckpoint`, which merges TP shards and
gathers ZeRO fragments one parameter at a time) and the universal checkpoints
``tools/grow_checkpoint.py`` and the LAG driver write (:class:`UniversalReader`: one full tensor
per file) -- given as a tag directory, a checkpoint directory, a run directory, or a LAG output
directory (``summary.json`` -> the promoted winner's run) / adaptive stage log directory
(``stages.json`` -> the last stage's promoted run). Memory: one full parameter plus the output
shard being filled (``max_shard_bytes``).

Tokenizer: the run's SentencePiece model with lag_ds's UL2 specials above it
(:class:`lag_ds.data.tokenizer.Ul2Tokenizer`: ``[SEP]``, mode tokens, ``<extra_id_N>``
sentinels), in two forms: ``tokenization_lagds.LagDSTokenizer`` (remote code; SentencePiece
itself, so the ids equal lag_ds's for every text) and ``tokenizer.json`` (what ``AutoTokenizer``
loads without remote code; the ``tokenizers`` port of the same model, which can split a tie
between equal-score segmentations differently, e.g. in some long runs of spaces). After writing,
both are checked against ``Ul2Tokenizer`` on sample texts; the export fails rather than ship a
tokenizer that disagrees.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ExportSource", "ModelShape", "UniversalReader", "export_hf", "hf_tensors",
           "infer_model_shape", "resolve_source"]

HF_CODE_DIR = Path(__file__).with_name("hf_code")
HF_CODE_FILES = ("configuration_lagds.py", "modeling_lagds.py")
HF_TOKENIZER_FILE = "tokenization_lagds.py"
RMS_NORM_EPS = 1e-5
"""megatron-core ``TransformerConfig.layernorm_epsilon`` default (lag_ds.model.build keeps it)."""
HIDDEN_ACT = "gelu"
"""lag_ds.model.build: ``activation_func=F.gelu`` (erf GELU) on the gate half: GeGLU."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST_KIND = "hf-export"
TOKENIZER_CHECK_TEXTS = (
    "Hello world", " leading space", "two  spaces", "tabs\tand\nnewlines\n\n  indented",
    "def f(x):\n    return x + 12345", "ünïcödé 日本語 🤖", "", "   ", "trailing ", "\n\nstart",
)
"""Texts whose ids must agree between the exported tokenizer and ``Ul2Tokenizer``."""

_NON_LAYER = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "embedding.position_embeddings.weight": "model.embed_positions.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_QKV = "self_attention.linear_qkv.weight"
_FC1 = "mlp.linear_fc1.weight"
_NOT_LAG_DS = ("lag_ds models have RMSNorm, no linear biases, learned absolute positions and a "
               "gated MLP")


# ------------------------------------------------------------------------------------------
# Finding the checkpoint (and the run it belongs to)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSource:
    """The checkpoint to export and, when known, the trainer config of the run that wrote it."""

    checkpoint: Path
    """A directory :func:`~lag_ds.checkpoint.formats.read_checkpoint_info` accepts."""
    train_config: Path | None
    """``<run_dir>/train_config.yaml`` (written by the LAG driver for every job) if present."""
    found: str
    """How the checkpoint was found (printed for the user)."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None


def _run_source(run_dir: Path, found: str) -> ExportSource:
    ckpt = run_dir / "checkpoints"
    if not ckpt.is_dir():
        raise ValueError(f"{run_dir}: run directory without checkpoints/ ({found})")
    config = run_dir / "train_config.yaml"
    return ExportSource(ckpt, config if config.is_file() else None, found)


def resolve_source(src: Path) -> ExportSource:
    """Map what the user named to a checkpoint directory; one-line ``ValueError`` if it is none.

    Accepted, in this order: a LAG output directory (``summary.json`` naming ``promoted_run``),
    an adaptive stage log directory (``stages.json``: the last stage's promoted run), a run
    directory (``checkpoints/`` inside), a checkpoint directory or a tag directory.
    """
    src = Path(src)
    if not src.exists():
        raise ValueError(f"{src}: no such file or directory")
    if not src.is_dir():
        raise ValueError(f"{src}: not a directory (expected a checkpoint, run or LAG output dir)")
    summary = src / "summary.json"
    if summary.is_file():
        data = _read_json(summary)
        if isinstance(data, dict) and data.get("promoted_run"):
            run = Path(data["promoted_run"])
            return _run_source(run, f"LAG run {src}: promoted winner {data.get('winner')} "
                                    f"(run {run})")
    stages = src / "stages.json"
    if stages.is_file():
        data = _read_json(stages)
        done = data.get("stages") if isinstance(data, dict) else None
        if not done:
            raise ValueError(f"{stages}: no finished stage yet (nothing promoted to export)")
        run = Path(done[-1]["run_dir"])
        return _run_source(run, f"adaptive run {src}: stage {done[-1].get('stage')} winner "
                                f"{done[-1].get('winner')} (run {run})")
    if (src / "checkpoints").is_dir():
        return _run_source(src, f"run directory {src}")
    config = None
    for run in (src.parent, src.parent.parent):  # <run>/checkpoints or <run>/checkpoints/<tag>
        candidate = run / "train_config.yaml"
        if candidate.is_file() and (run / "checkpoints") in (src, src.parent):
            config = candidate
            break
    return ExportSource(src, config, f"checkpoint {src}")


# ------------------------------------------------------------------------------------------
# Reading parameters
# ------------------------------------------------------------------------------------------


class UniversalReader:
    """:class:`~lag_ds.checkpoint.formats.CheckpointReader` of DeepSpeed's universal layout
    (``TAG/zero/<param>/fp32.pt`` holding the full, TP-merged fp32 tensor), as written by
    ``tools/grow_checkpoint.py`` for ZeRO-1/2 sources and by the LAG driver for candidates. The
    registry has no tensor reader for it; this one reads only ``fp32`` (no moments needed)."""

    format, family = "deepspeed-universal", "megatron-core-gpt"

    def __init__(self, tag_dir: Path, *, unsafe_load: bool = False) -> None:
        from lag_ds.checkpoint.megatron_layout import split_layer_name
        from lag_ds.checkpoint.safe_load import load_checkpoint_file

        self.tag_dir, self.unsafe = Path(tag_dir), unsafe_load
        zero = self.tag_dir / "zero"
        self._names = sorted(p.name for p in zero.iterdir() if (p / "fp32.pt").is_file())
        layers = sorted({s[0] for n in self._names if (s := split_layer_name(n))})
        if not layers or layers != list(range(len(layers))):
            raise ValueError(f"{zero}: decoder layers {layers[:8]} are not 0..L-1")
        self.num_layers = len(layers)
        meta = load_checkpoint_file(self.tag_dir / "mp_rank_00_model_states.pt", unsafe=unsafe_load)
        self.global_steps = int(meta.get("global_steps", 0))
        self._shapes: dict[str, tuple[int, ...]] = {}

    def param_names(self) -> list[str]:
        return list(self._names)

    def full_shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            self._shapes[name] = tuple(self.value(name).shape)
        return self._shapes[name]

    def value(self, name: str, key: str = "fp32") -> torch.Tensor:
        from lag_ds.checkpoint.safe_load import load_checkpoint_file

        path = self.tag_dir / "zero" / name / f"{key}.pt"
        data = load_checkpoint_file(path, unsafe=self.unsafe)
        tensor = data.get("param") if isinstance(data, dict) else None
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: no 'param' tensor (not a universal checkpoint file)")
        return tensor.float()


def open_reader(checkpoint: Path, *, unsafe_load: bool = False) -> tuple[Any, Any]:
    """(CheckpointInfo, reader) for a lag_ds checkpoint; ``ValueError`` for any other layout."""
    from lag_ds.checkpoint.formats import open_checkpoint, read_checkpoint_info

    info = read_checkpoint_info(checkpoint, unsafe_load=unsafe_load)
    if info.family != "megatron-core-gpt":
        raise ValueError(f"{checkpoint}: a {info.format} checkpoint of a {info.family} model is "
                         f"not a lag_ds model (megatron-core GPT); cannot export it")
    if info.format in ("deepspeed", "deepspeed-zero3"):  # readers yield full fp32 tensors
        return info, open_checkpoint(checkpoint, unsafe_load=unsafe_load)
    if info.format == "deepspeed-universal":
        return info, UniversalReader(info.path, unsafe_load=unsafe_load)
    raise ValueError(f"{checkpoint}: {info.format} checkpoints cannot be exported")


# ------------------------------------------------------------------------------------------
# Shapes and tensor mapping
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What ``config.json`` needs, read from the checkpoint's tensors (heads given)."""

    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_query_groups: int
    max_positions: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def infer_model_shape(reader: Any, num_heads: int) -> ModelShape:
    """Sizes from parameter shapes; ``ValueError`` naming the first parameter the HF model
    cannot hold (so nothing is silently dropped)."""
    from lag_ds.checkpoint.megatron_layout import split_layer_name

    names = reader.param_names()
    for name in names:
        split = split_layer_name(name)
        if split is None and name not in _NON_LAYER:
            raise ValueError(f"{name}: no Hugging Face counterpart ({_NOT_LAG_DS})")
        if split is not None and split[1] not in _LAYER and split[1] not in (_QKV, _FC1):
            raise ValueError(f"{name}: no Hugging Face counterpart ({_NOT_LAG_DS})")
    for required, why in (("embedding.word_embeddings.weight", "word embeddings"),
                          ("embedding.position_embeddings.weight",
                           "learned position embeddings; rotary-position models are not exported"),
                          ("decoder.final_layernorm.weight", "final norm")):
        if required not in names:
            raise ValueError(f"checkpoint has no {required} ({why})")
    vocab, hidden = reader.full_shape("embedding.word_embeddings.weight")
    max_positions = reader.full_shape("embedding.position_embeddings.weight")[0]
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"number of attention heads must be a positive int, got {num_heads!r}")
    if hidden % num_heads:
        raise ValueError(f"hidden size {hidden} is not divisible by {num_heads} attention heads")
    head_dim = hidden // num_heads
    qkv_rows = reader.full_shape(f"decoder.layers.0.{_QKV}")[0]
    kv_rows = qkv_rows - num_heads * head_dim
    if kv_rows <= 0 or kv_rows % (2 * head_dim) or num_heads % (kv_rows // (2 * head_dim)):
        raise ValueError(f"decoder.layers.0.{_QKV} has {qkv_rows} rows, which does not fit "
                         f"{num_heads} heads of size {head_dim} (wrong --num-heads?)")
    groups = kv_rows // (2 * head_dim)
    fc1_rows = reader.full_shape(f"decoder.layers.0.{_FC1}")[0]
    ffn = reader.full_shape("decoder.layers.0.mlp.linear_fc2.weight")[1]
    if fc1_rows != 2 * ffn:
        raise ValueError(f"decoder.layers.0.{_FC1} has {fc1_rows} rows for an FFN of {ffn}: not a "
                         f"gated MLP ({_NOT_LAG_DS})")
    for name in names:  # every layer like layer 0 (HF builds identical layers)
        split = split_layer_name(name)
        if split is not None and split[0] > 0:
            first = f"decoder.layers.0.{split[1]}"
            if first not in names or reader.full_shape(name) != reader.full_shape(first):
                raise ValueError(f"{name}: shape or presence differs from layer 0")
    return ModelShape(vocab_size=vocab, hidden_size=hidden, ffn_hidden_size=ffn,
                      num_layers=reader.num_layers, num_heads=num_heads, num_query_groups=groups,
                      max_positions=max_positions, tied="output_layer.weight" not in names)


def hf_tensors(name: str, tensor: torch.Tensor, shape: ModelShape
               ) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors of one full megatron-core parameter (two or three for fused ones)."""
    from lag_ds.checkpoint.megatron_layout import split_layer_name

    split = split_layer_name(name)
    if split is None:
        return [(_NON_LAYER[name], tensor)]
    layer, suffix = split
    prefix = f"model.layers.{layer}."
    if suffix == _QKV:
        per_group = shape.num_heads // shape.num_query_groups
        grouped = tensor.reshape(shape.num_query_groups, per_group + 2, shape.head_dim, -1)
        q = grouped[:, :per_group].reshape(shape.num_heads * shape.head_dim, -1)
        k = grouped[:, per_group].reshape(shape.num_query_groups * shape.head_dim, -1)
        v = grouped[:, per_group + 1].reshape(shape.num_query_groups * shape.head_dim, -1)
        return [(prefix + "self_attn.q_proj.weight", q), (prefix + "self_attn.k_proj.weight", k),
                (prefix + "self_attn.v_proj.weight", v)]
    if suffix == _FC1:
        gate, up = tensor.chunk(2, dim=0)
        return [(prefix + "mlp.gate_proj.weight", gate), (prefix + "mlp.up_proj.weight", up)]
    return [(prefix + _LAYER[suffix], tensor)]


# ------------------------------------------------------------------------------------------
# Config, tokenizer
# ------------------------------------------------------------------------------------------


def _checkpoint_preset(info: Any, unsafe_load: bool) -> str | None:
    """The trainer's client state records ``preset``; grown/universal checkpoints keep it."""
    from lag_ds.checkpoint.safe_load import load_checkpoint_file

    name = ("zero_pp_rank_0_mp_rank_00_model_states.pt" if info.format == "deepspeed-zero3"
            else "mp_rank_00_model_states.pt")
    meta = load_checkpoint_file(Path(info.path) / name, unsafe=unsafe_load)
    preset = meta.get("preset") if isinstance(meta, dict) else None
    return preset if isinstance(preset, str) else None


def _num_heads(given: int | None, ckpt_preset: str | None, train_cfg: Any,
               hidden: int | None) -> tuple[int, str]:
    """Attention heads (not visible in tensor shapes): ``--num-heads``, else the preset."""
    from lag_ds.model.presets import PRESETS

    if given is not None:
        return given, "--num-heads"
    for preset, where in ((ckpt_preset, "checkpoint"),
                          (getattr(train_cfg, "preset", None), "train config")):
        if preset in PRESETS:
            cfg = PRESETS[preset]
            if hidden is not None and cfg.hidden_size != hidden:
                raise ValueError(f"{where} preset {preset!r} has hidden size {cfg.hidden_size}, "
                                 f"the checkpoint {hidden}: pass --num-heads")
            return cfg.num_attention_heads, f"preset {preset!r} ({where})"
    raise ValueError("cannot tell the number of attention heads (no known preset in the "
                     "checkpoint or train config): pass --num-heads")


def _hf_config(shape: ModelShape, tok: Any, dtype: str) -> dict[str, Any]:
    from lag_ds.export.hf_code.configuration_lagds import LagDSConfig  # shipped as-is

    config = LagDSConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.ffn_hidden_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_query_groups,
        head_dim=shape.head_dim, hidden_act=HIDDEN_ACT, max_position_embeddings=shape.max_positions,
        rms_norm_eps=RMS_NORM_EPS, tie_word_embeddings=shape.tied, attention_bias=False,
        mlp_bias=False, position_embedding_type="learned_absolute",
        pad_token_id=tok.pad_id if tok else None, bos_token_id=tok.bos_id if tok else None,
        eos_token_id=tok.eos_id if tok else None,
    )
    data = config.to_dict()
    data["architectures"] = ["LagDSForCausalLM"]
    data["auto_map"] = {"AutoConfig": "configuration_lagds.LagDSConfig",
                        "AutoModelForCausalLM": "modeling_lagds.LagDSForCausalLM",
                        "AutoModel": "modeling_lagds.LagDSModel"}
    data["dtype"] = dtype
    return data


def _resolve_tokenizer(path: Path | None, num_sentinels: int | None, train_cfg: Any,
                       log: Callable[[str], None]) -> Any:
    """The run's ``Ul2Tokenizer``: ``--tokenizer``, else the one the trainer config names (its
    ``data.tokenizer_model``, or the SentencePiece model it trained, found in its cache exactly
    as the trainer finds it). None when neither is known."""
    from lag_ds.data.tokenizer import Ul2Tokenizer

    data = getattr(train_cfg, "data", None)
    sentinels = num_sentinels if num_sentinels is not None else getattr(data, "num_sentinels", 100)
    if path is not None:
        return Ul2Tokenizer(path, num_sentinels=sentinels)
    if data is None:
        return None
    if data.tokenizer_model:
        return Ul2Tokenizer(data.tokenizer_model, num_sentinels=sentinels)
    from lag_ds.data.corpus import resolve_source as resolve_corpus

    cache = Path(train_cfg.cache_dir)
    source = resolve_corpus(data.source, cache, demo_max_bytes=data.demo_max_bytes)
    tok = Ul2Tokenizer.train_or_load(source, cache / "tokenizers", config=data.spm_config(),
                                     num_sentinels=sentinels, text_field=data.text_field)
    if tok.trained:
        log(f"tokenizer was not in the cache {cache}: retrained it from {source} with the run's "
            f"settings (deterministic) -> {tok.model_file}")
    return tok


def _write_tokenizer(tok: Any, out: Path) -> None:
    """The tokenizer in two forms, then check both against ``tok`` (``ValueError`` if they differ).

    * ``tokenization_lagds.LagDSTokenizer`` (remote code, ``auto_map``; what
      ``AutoTokenizer.from_pretrained(out, trust_remote_code=True)`` loads): SentencePiece itself,
      so ids equal ``Ul2Tokenizer``'s for every text;
    * ``tokenizer.json`` (``TokenizersBackend``; what ``AutoTokenizer`` loads without remote
      code): the ``tokenizers`` port, which can break ties between equal-score segmentations
      differently (rare; long runs of spaces).
    """
    import tempfile

    from tokenizers import AddedToken
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    from lag_ds.export.hf_code.tokenization_lagds import LagDSTokenizer

    names = {"pad_token": tok.id_to_token(tok.pad_id), "unk_token": tok.id_to_token(tok.unk_id),
             "bos_token": tok.id_to_token(tok.bos_id), "eos_token": tok.id_to_token(tok.eos_id)}
    specials = [AddedToken(tok.id_to_token(i), special=True, normalized=False)
                for i in range(tok.sp_vocab_size, tok.vocab_size)]
    exact = LagDSTokenizer(vocab_file=str(tok.model_file), **names)
    exact.add_tokens(specials, special_tokens=True)
    exact.save_pretrained(str(out))
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(tok.model_file, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "TokenizersBackend"}))
        fast = TokenizersBackend.from_pretrained(tmp, **names)
    fast.add_tokens(specials, special_tokens=True)
    fast.backend_tokenizer.save(str(out / "tokenizer.json"))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    config["auto_map"] = {"AutoTokenizer": ["tokenization_lagds.LagDSTokenizer", None]}
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    shutil.copyfile(HF_CODE_DIR / HF_TOKENIZER_FILE, out / HF_TOKENIZER_FILE)

    loaded = [LagDSTokenizer.from_pretrained(str(out)),
              AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)]
    for hf in loaded:
        kind = type(hf).__name__
        for text in TOKENIZER_CHECK_TEXTS:
            ours, theirs = tok.encode(text), hf.encode(text, add_special_tokens=False)
            if ours != theirs or hf.decode(ours) != text:
                raise ValueError(f"exported tokenizer ({kind}) disagrees with lag_ds's on "
                                 f"{text!r}: {theirs[:12]} vs {ours[:12]}")
        for i in range(tok.sp_vocab_size, tok.vocab_size):
            if hf.convert_tokens_to_ids(tok.id_to_token(i)) != i:
                raise ValueError(f"exported tokenizer ({kind}) maps {tok.id_to_token(i)!r} to "
                                 f"{hf.convert_tokens_to_ids(tok.id_to_token(i))}, lag_ds to {i}")


# ------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------


def _shards(items: Iterator[tuple[str, torch.Tensor]], max_bytes: int
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Group tensors into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for key, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[key] = tensor
        size += nbytes
    if shard:
        yield shard


def export_hf(src: Path, dst: Path, *, num_heads: int | None = None,
              tokenizer: Path | None = None, num_sentinels: int | None = None,
              train_config: Path | None = None, no_tokenizer: bool = False,
              dtype: str = "float32", max_shard_bytes: int = 2 << 30, show_progress: bool = True,
              unsafe_load: bool = False, log: Callable[[str], None] | None = None
              ) -> dict[str, Any]:
    """Write ``dst``, a ``transformers`` model directory of the lag_ds checkpoint ``src``.

    Returns the lag_ds manifest (written last). Raises a one-line ``ValueError`` before writing
    anything for: a missing or unrecognised source, an existing ``dst``, ``dst`` inside the
    source, a model the HF classes cannot hold, unknown heads, no tokenizer (unless
    ``no_tokenizer``), a tokenizer larger than the model's vocabulary. ``src`` is only read.
    """
    from lag_ds.checkpoint.atomic import AtomicDirectory, check_free_space
    from lag_ds.checkpoint.formats import check_destination, progress_bar
    from lag_ds.checkpoint.manifest import write_manifest

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    src, dst = Path(src), Path(dst)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) \
            or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    source = resolve_source(src)
    check_destination(dst)
    dst_real = dst.resolve()
    for root in {src.resolve(), source.checkpoint.resolve()}:
        if dst_real == root or root in dst_real.parents:
            raise ValueError(f"output {dst} is inside the source {root} (the source is only read)")
    if not dst_real.parent.is_dir():
        raise ValueError(f"parent directory of the output does not exist: {dst.parent}")
    say(f"source: {source.found}")

    info, reader = open_reader(source.checkpoint, unsafe_load=unsafe_load)
    cfg_path = Path(train_config) if train_config is not None else source.train_config
    train_cfg = None
    if cfg_path is not None:
        from lag_ds.config import load_yaml
        from lag_ds.train.config import TrainConfig

        train_cfg = load_yaml(TrainConfig, cfg_path)
        say(f"train config: {cfg_path}")
    hidden = (reader.full_shape("embedding.word_embeddings.weight")[1]
              if "embedding.word_embeddings.weight" in reader.param_names() else None)
    heads, heads_from = _num_heads(num_heads, _checkpoint_preset(info, unsafe_load), train_cfg,
                                   hidden)
    shape = infer_model_shape(reader, heads)
    say(f"checkpoint: {info.format} {info.path} (step {info.step}, ZeRO "
        f"{info.zero_stage if info.zero_stage is not None else '-'}): {shape.num_layers} layers, "
        f"hidden {shape.hidden_size}, FFN {shape.ffn_hidden_size}, {shape.num_heads} heads "
        f"({heads_from}), vocab {shape.vocab_size}, {shape.max_positions} positions, "
        f"{'tied' if shape.tied else 'untied'} output layer")

    tok = None
    if not no_tokenizer:
        tok = _resolve_tokenizer(tokenizer, num_sentinels, train_cfg, say)
        if tok is None:
            raise ValueError("no tokenizer: pass --tokenizer FILE.model, or --config RUN.yaml (the "
                             "run's trainer config), or --no-tokenizer")
        if tok.vocab_size > shape.vocab_size:
            raise ValueError(f"tokenizer {tok.model_file} has {tok.vocab_size} ids, the model only "
                             f"{shape.vocab_size} embeddings (not this run's tokenizer?)")
        say(f"tokenizer: {tok.model_file} ({tok.vocab_size} ids incl. {tok.num_sentinels} "
            f"sentinels; model vocabulary padded to {shape.vocab_size})")
    config = _hf_config(shape, tok, dtype)

    names = reader.param_names()
    total = sum(math.prod(reader.full_shape(n)) for n in names) * DTYPES[dtype].itemsize
    check_free_space(dst_real.parent, total)
    target = DTYPES[dtype]

    with AtomicDirectory(dst) as tmp:
        bar = progress_bar(show_progress, total=len(names), desc=f"export {dst.name}")

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for name in names:
                for key, tensor in hf_tensors(name, reader.value(name), shape):
                    yield key, tensor.to(target).contiguous()
                bar.update(1)

        weight_map = _write_weights(tmp, tensors(), max_shard_bytes, total)
        bar.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in HF_CODE_FILES:
            shutil.copyfile(HF_CODE_DIR / name, tmp / name)
        if tok is not None:
            _write_tokenizer(tok, tmp)
            generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                          "pad_token_id": tok.pad_id}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        hashing = progress_bar(show_progress, total=len(list(tmp.iterdir())), desc="hashing",
                               unit="file")
        manifest = write_manifest(
            tmp, kind=MANIFEST_KIND, progress=hashing.update,
            source={"path": str(source.checkpoint.resolve()), "found": source.found,
                    "format": info.format, "step": info.step, "zero_stage": info.zero_stage,
                    "train_config": str(cfg_path) if cfg_path else None},
            plan=None,
            extra={"num_layers": shape.num_layers, "num_heads": shape.num_heads,
                   "num_heads_from": heads_from, "dtype": dtype, "num_tensors": len(weight_map),
                   "tokenizer": str(tok.model_file) if tok is not None else None,
                   "loads_with": "AutoModelForCausalLM.from_pretrained(dir, "
                                 "trust_remote_code=True)"})
        hashing.close()
    say(f"wrote {dst}: {len(weight_map)} tensors, {total / 1e6:.1f} MB ({dtype})")
    return manifest


def _write_weights(tmp: Path, items: Iterator[tuple[str, torch.Tensor]], max_bytes: int,
                   total: int) -> dict[str, str]:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    files: list[tuple[Path, list[str]]] = []
    for number, shard in enumerate(_shards(items, max_bytes), start=1):
        path = tmp / f"model-{number:05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        files.append((path, list(shard)))
        del shard
    if len(files) == 1:
        files[0][0].rename(tmp / "model.safetensors")
        return {key: "model.safetensors" for key in files[0][1]}
    for number, (path, keys) in enumerate(files, start=1):
        name = f"model-{number:05d}-of-{len(files):05d}.safetensors"
        path.rename(tmp / name)
        weight_map.update({key: name for key in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
