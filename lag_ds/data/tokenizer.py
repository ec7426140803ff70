"""SentencePiece tokenizer with T5-style UL2 special tokens appended above the piece vocabulary.

Why: UL2 needs, besides ordinary text pieces, a separator, one *mode token* per denoiser and up
to ``num_sentinels`` span-corruption sentinels. Keeping them *outside* the SentencePiece model
(ids above it) means a stock ``.model`` file works unchanged, the sentinels never occur in raw
text, and sentinel ``j`` has the T5 id ``vocab_size - 1 - j``.

Id layout for a SentencePiece model with ``P`` pieces, ``M`` mode tokens and ``N`` sentinels
(total ``vocab_size = P + 1 + M + N``)::

    0 <pad>   1 <unk>   2 <s> (bos)   3 </s> (eos)      # set when *we* train the model
    4 ... P-1                 SentencePiece pieces ("\\n" and "\\t" are user-defined pieces)
    P                         [SEP]
    P+1 ... P+M               mode tokens, in MODE_TOKENS order: [CLM] [S2S] [NLU]
    P+M+1 ... P+M+N           sentinels, counting down: sentinel j = vocab_size - 1 - j
                              (rendered "<extra_id_j>" by decode)

A loaded ``.model`` must define pad, bos and eos (SentencePiece's default has no pad: train
with ``pad_id``), otherwise ``ValueError``.

Training (:func:`train_sentencepiece`), exact parameters: the sample is up to
``input_sentence_size`` (default 100,000) non-blank lines, drawn by reservoir sampling with
``np.random.default_rng(seed)`` from the first ``max_documents`` documents (all by default) and
kept in corpus order; SentencePiece is then run with ``model_type`` (default ``"unigram"``),
``vocab_size`` (default 8,000), ``byte_fallback=True`` (any text round-trips),
``normalization_rule_name="identity"`` and ``remove_extra_whitespaces=False`` (code
indentation survives), ``split_digits=True``, ``allow_whitespace_only_pieces=True``,
``character_coverage=0.9995``, ``num_threads`` (default 2) and its global random seed set to
``seed``. SentencePiece's result is deterministic for a fixed sample *and* thread count, so
``num_threads`` is part of the cache key. :meth:`Ul2Tokenizer.train_or_load` caches the model
as ``<cache_dir>/spm-<key>.model`` with ``key`` = hash(source content, parameters) and reuses it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lag_ds.data.cache import file_lock, hash_json, temp_path

SEP_TOKEN = "[SEP]"
MODE_TOKENS = ("[CLM]", "[S2S]", "[NLU]")
_SPM_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class SpmTrainConfig:
    """How a SentencePiece model is trained from a corpus (every field is in the cache key)."""

    vocab_size: int = 8000  # SentencePiece pieces incl. pad/unk/bos/eos; specials come on top
    model_type: str = "unigram"  # "unigram" (T5) or "bpe"
    input_sentence_size: int = 100_000  # max lines in the training sample
    max_documents: int | None = None  # only sample from the first N documents (None: all)
    byte_fallback: bool = True  # needs vocab_size > ~262 (256 byte pieces)
    character_coverage: float = 0.9995
    num_threads: int = 2  # fixed: the trained model depends on it
    seed: int = 0  # reservoir sampling + SentencePiece's random generator

    def __post_init__(self) -> None:
        if self.model_type not in ("unigram", "bpe"):
            raise ValueError(f"SpmTrainConfig.model_type must be 'unigram' or 'bpe', "
                             f"got {self.model_type!r}")
        min_vocab = 6 + (256 if self.byte_fallback else 0) + 1
        if self.vocab_size < min_vocab:
            raise ValueError(f"SpmTrainConfig.vocab_size={self.vocab_size} is below {min_vocab} "
                             f"(byte_fallback={self.byte_fallback})")
        if self.input_sentence_size <= 0 or self.num_threads <= 0:
            raise ValueError("SpmTrainConfig.input_sentence_size and num_threads must be > 0")


def sample_sentences(documents: Iterable[str], *, size: int, seed: int,
                     max_documents: int | None = None) -> list[str]:
    """Reservoir-sample ``size`` non-blank lines of ``documents``; return them in corpus order."""
    rng = np.random.default_rng(seed)
    reservoir: list[tuple[int, str]] = []
    seen = 0
    for d, doc in enumerate(documents):
        if max_documents is not None and d >= max_documents:
            break
        for line in doc.split("\n"):
            if not line.strip():
                continue
            if seen < size:
                reservoir.append((seen, line))
            else:
                k = int(rng.integers(0, seen + 1))
                if k < size:
                    reservoir[k] = (seen, line)
            seen += 1
    return [line for _, line in sorted(reservoir)]


def train_sentencepiece(documents: Iterable[str], model_path: Path, *,
                        config: SpmTrainConfig) -> Path:
    """Train a SentencePiece model on a sample of ``documents``; write it atomically to
    ``model_path`` (a ``.model`` file). Returns ``model_path``."""
    import sentencepiece as spm

    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise ValueError(f"train_sentencepiece: model_path {model_path} must end in .model")
    sample = sample_sentences(documents, size=config.input_sentence_size, seed=config.seed,
                              max_documents=config.max_documents)
    if not sample:
        raise ValueError("train_sentencepiece: the corpus has no non-blank line to train on")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = temp_path(model_path.with_suffix(""))
    spm.set_random_generator_seed(config.seed)
    try:
        _train(spm, sample, tmp_prefix, config)
        os.replace(f"{tmp_prefix}.model", model_path)
    finally:
        for suffix in (".model", ".vocab"):
            Path(f"{tmp_prefix}{suffix}").unlink(missing_ok=True)
    return model_path


def _train(spm: object, sample: list[str], prefix: Path, config: SpmTrainConfig) -> None:
    try:
        spm.SentencePieceTrainer.train(  # type: ignore[attr-defined]
            sentence_iterator=iter(sample), model_prefix=str(prefix),
            vocab_size=config.vocab_size, model_type=config.model_type,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=["\n", "\t"],
            byte_fallback=config.byte_fallback, character_coverage=config.character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True,
            input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=config.num_threads, minloglevel=2)
    except RuntimeError as e:  # e.g. "Vocabulary size too high (N). Please set it to <= M."
        raise ValueError(f"SentencePiece training failed (SpmTrainConfig.vocab_size="
                         f"{config.vocab_size}, {len(sample)} sample lines): {e}") from e


class Ul2Tokenizer:
    """A SentencePiece model plus [SEP], mode tokens and sentinels (layout in module docstring)."""

    def __init__(self, model_file: Path | str, *, num_sentinels: int = 100,
                 mode_tokens: Sequence[str] = MODE_TOKENS) -> None:
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise ValueError(f"tokenizer model {self.model_file} does not exist")
        if num_sentinels < 0:
            raise ValueError(f"num_sentinels must be >= 0, got {num_sentinels}")
        if len(set(mode_tokens)) != len(mode_tokens) or SEP_TOKEN in mode_tokens:
            raise ValueError(f"mode_tokens must be distinct and not {SEP_TOKEN}: {mode_tokens}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        for name, value in (("pad", self.sp.pad_id()), ("bos", self.sp.bos_id()),
                            ("eos", self.sp.eos_id())):
            if value < 0:
                raise ValueError(f"tokenizer model {self.model_file} defines no {name} id "
                                 f"(train it with {name}_id set)")
        self.num_sentinels = num_sentinels
        self.mode_tokens = tuple(mode_tokens)
        self.sp_vocab_size: int = self.sp.get_piece_size()
        self.vocab_size: int = self.sp_vocab_size + 1 + len(self.mode_tokens) + num_sentinels
        self.trained = False  # set by train_or_load when this call ran the trainer
        names = [SEP_TOKEN, *self.mode_tokens]
        names += [f"<extra_id_{num_sentinels - 1 - i}>" for i in range(num_sentinels)]
        self._special_names = names  # id sp_vocab_size + i -> names[i]

    @classmethod
    def train_or_load(cls, source: str, cache_dir: Path, *, config: SpmTrainConfig,
                      num_sentinels: int = 100, text_field: str = "text") -> "Ul2Tokenizer":
        """Return the tokenizer trained on ``source``, training it only if not cached yet."""
        from lag_ds.data.corpus import iter_documents, source_fingerprint

        key = hash_json({"format": _SPM_FORMAT, "spm": asdict(config),
                         "source": source_fingerprint(source, text_field=text_field)})
        model_path = Path(cache_dir) / f"spm-{key[:20]}.model"
        trained = False
        with file_lock(model_path.with_suffix(".lock")):
            if not model_path.exists():
                train_sentencepiece(iter_documents(source, text_field=text_field), model_path,
                                    config=config)
                trained = True
        tok = cls(model_path, num_sentinels=num_sentinels)
        tok.trained = trained
        return tok

    # --------------------------------------------------------------------- special ids

    @property
    def pad_id(self) -> int:
        return int(self.sp.pad_id())

    @property
    def bos_id(self) -> int:
        return int(self.sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    @property
    def unk_id(self) -> int:
        return int(self.sp.unk_id())

    @property
    def sep_id(self) -> int:
        return self.sp_vocab_size

    def mode_id(self, name: str) -> int:
        """Id of a mode token, e.g. ``mode_id("[NLU]")``."""
        if name not in self.mode_tokens:
            raise ValueError(f"unknown mode token {name!r}; known: {self.mode_tokens}")
        return self.sp_vocab_size + 1 + self.mode_tokens.index(name)

    def sentinel_id(self, j: int) -> int:
        """Id of sentinel ``j`` (T5's ``<extra_id_j>``): ``vocab_size - 1 - j``."""
        if not 0 <= j < self.num_sentinels:
            raise ValueError(f"sentinel index {j} outside [0, {self.num_sentinels})")
        return self.vocab_size - 1 - j

    # --------------------------------------------------------------------- text <-> ids

    def encode(self, text: str) -> list[int]:
        """SentencePiece ids of ``text`` (no bos/eos added)."""
        return list(self.sp.encode(text, out_type=int))

    def encode_batch(self, texts: list[str], *, num_threads: int = 1) -> list[list[int]]:
        """``[encode(t) for t in texts]``, using SentencePiece's threads."""
        return [list(x) for x in self.sp.encode(texts, out_type=int, num_threads=num_threads)]

    def id_to_token(self, i: int) -> str:
        if 0 <= i < self.sp_vocab_size:
            return str(self.sp.id_to_piece(i))
        if self.sp_vocab_size <= i < self.vocab_size:
            return self._special_names[i - self.sp_vocab_size]
        raise ValueError(f"token id {i} outside [0, {self.vocab_size})")

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; pad/bos/eos vanish, [SEP]/modes/sentinels print as their names."""
        out: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if 0 <= i < self.sp_vocab_size:
                run.append(i)
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            out.append(self.id_to_token(i))
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def __repr__(self) -> str:
        return (f"Ul2Tokenizer({self.model_file.name}, sp_vocab={self.sp_vocab_size}, "
                f"vocab={self.vocab_size}, sentinels={self.num_sentinels})")
