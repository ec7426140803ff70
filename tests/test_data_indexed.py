"""megatron-core .bin/.idx round trip, deterministic split, and prepare_data end to end."""

import json
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lag_ds.data.batches import TokenStream, Ul2BatchSource
from lag_ds.data.indexed import (
    build_indexed_dataset,
    build_train_valid_datasets,
    is_validation_document,
    load_indexed_dataset,
)
from lag_ds.data.prepare import DataConfig, prepare_data


class CharEncoder:
    """Tiny stand-in tokenizer: one id per character (ord % 90 + 4), eos = 3."""

    vocab_size = 300
    eos_id = 3

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 90 + 4 for c in text]

    def encode_batch(self, texts: list[str], *, num_threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]


ENC = CharEncoder()


def test_round_trip_with_megatron_reader(tmp_path: Path) -> None:
    docs = ["hello world", "a", "the end."]
    prefix = build_indexed_dataset(docs, ENC, tmp_path / "ds")
    ds = load_indexed_dataset(prefix)
    assert len(ds) == 3
    assert ds.document_indices.tolist() == [0, 1, 2, 3]  # one sequence per document
    assert ds.index.dtype == np.uint16
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == ENC.encode(doc) + [3]
    assert ds.sequence_lengths.tolist() == [12, 2, 9]
    stream = TokenStream(ds)
    flat = sum((ENC.encode(d) + [3] for d in docs), [])
    assert stream.total == len(flat)
    assert stream.window(10, 6).tolist() == flat[10:16]  # spans three documents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]  # no temp files
    mtime = (tmp_path / "ds.bin").stat().st_mtime_ns
    build_indexed_dataset(["different"], ENC, tmp_path / "ds")  # present: not rebuilt
    assert (tmp_path / "ds.bin").stat().st_mtime_ns == mtime


def test_split_rule() -> None:
    picks = [i for i in range(200) if is_validation_document(i, 0.01)]
    assert picks == [99, 199]
    assert [i for i in range(10) if is_validation_document(i, 0.25)] == [3, 7]
    n = 1000
    assert sum(is_validation_document(i, 0.3) for i in range(n)) == 300


def test_train_valid_split_contents(tmp_path: Path) -> None:
    docs = [f"doc{i}" for i in range(10)]
    tr, va = build_train_valid_datasets(docs, ENC, tmp_path / "train", tmp_path / "valid",
                                        valid_fraction=0.2)
    train, valid = load_indexed_dataset(tr), load_indexed_dataset(va)
    assert [valid[i].tolist() for i in range(len(valid))] == [ENC.encode(d) + [3] for d in
                                                              ("doc4", "doc9")]
    assert len(train) == 8 and train[4].tolist() == ENC.encode("doc5") + [3]
    with pytest.raises(ValueError, match="no document"):
        build_train_valid_datasets(docs[:2], ENC, tmp_path / "t2", tmp_path / "v2",
                                   valid_fraction=0.2)
    assert not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(ValueError, match="does not exist"):
        load_indexed_dataset(tmp_path / "t2")


def _corpus(path: Path, docs: int = 120) -> Path:
    rnd = random.Random(0)
    words = ["".join(rnd.choice("abcdefghijklmnop") for _ in range(rnd.randint(2, 6)))
             for _ in range(200)]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rnd.choice(words) for _ in range(40))}) + "\n")
    return path


def test_prepare_data_concurrent_callers_share_one_build(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import lag_ds.data.tokenizer as tokmod

    cfg = DataConfig(source=str(_corpus(tmp_path / "c.jsonl")), vocab_size=150,
                     tokenizer_byte_fallback=False, num_sentinels=20, valid_fraction=0.1,
                     tokenizer_sample_lines=5000)
    trainings: list[int] = []
    real = tokmod.train_sentencepiece
    monkeypatch.setattr(tokmod, "train_sentencepiece",
                        lambda *a, **k: trainings.append(1) or real(*a, **k))
    results, errors = [], []

    def call() -> None:
        try:
            results.append(prepare_data(cfg, tmp_path / "cache"))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(trainings) == 1  # one caller trained, the others waited and reused
    assert results[0] == results[1] == results[2]
    p = results[0]
    assert (p.num_train_documents, p.num_valid_documents) == (108, 12)
    tok = p.tokenizer()
    assert tok.sp_vocab_size == 150 and tok.vocab_size == 150 + 4 + 20
    train, valid = p.train_dataset(), p.valid_dataset()
    assert len(train) == 108 and len(valid) == 12
    texts = [json.loads(x)["text"] for x in Path(cfg.source).read_text().splitlines()]
    assert valid[0].tolist() == tok.encode(texts[9]) + [tok.eos_id]
    assert tok.decode(train[0].tolist()) == texts[0]
    # the batch source reads the megatron dataset exactly like the same docs in memory
    mem = [np.asarray(train[i]) for i in range(len(train))]
    a = Ul2BatchSource(train, tok, seq_len=64, global_batch_size=4, seed=0).global_batch(3)
    b = Ul2BatchSource(mem, tok, seq_len=64, global_batch_size=4, seed=0).global_batch(3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.loss_mask, b.loss_mask)
    assert int(a.tokens.max()) < tok.vocab_size
    # other settings -> other cache entry; same settings -> same entry
    assert prepare_data(cfg, tmp_path / "cache") == p
    other = prepare_data(DataConfig(**{**cfg.__dict__, "valid_fraction": 0.2}), tmp_path / "cache")
    assert other.directory != p.directory and other.num_valid_documents == 24
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.model"))) == 1


def test_data_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid_fraction"):
        DataConfig(valid_fraction=0.0)
    with pytest.raises(ValueError, match="tokenizer_model"):
        DataConfig(tokenizer_model=str(tmp_path / "none.model"))
    with pytest.raises(ValueError, match="vocab_size"):
        DataConfig(vocab_size=100)  # byte fallback needs more pieces
