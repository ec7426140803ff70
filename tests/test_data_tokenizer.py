"""SentencePiece + UL2 specials: id layout, round trip, caching, determinism."""

import json
import random
from pathlib import Path

import pytest

from lag_ds.data.tokenizer import MODE_TOKENS, SpmTrainConfig, Ul2Tokenizer, sample_sentences

CFG = SpmTrainConfig(vocab_size=200, byte_fallback=False, input_sentence_size=2000, seed=3)


def write_corpus(path: Path, *, docs: int = 150, seed: int = 0) -> Path:
    rnd = random.Random(seed)
    words = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 7)))
             for _ in range(300)]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(docs):
            lines = [" ".join(rnd.choice(words) for _ in range(10)) for _ in range(3)]
            f.write(json.dumps({"text": "\n".join(lines)}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c.jsonl")


@pytest.fixture(scope="module")
def tok(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Ul2Tokenizer:
    return Ul2Tokenizer.train_or_load(str(corpus), tmp_path_factory.mktemp("cache"), config=CFG,
                                      num_sentinels=10)


def test_special_ids_sit_above_the_sentencepiece_vocab(tok: Ul2Tokenizer) -> None:
    assert tok.sp_vocab_size == 200
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 200 + 1 + len(MODE_TOKENS) + 10
    assert tok.sep_id == 200
    assert [tok.mode_id(m) for m in ("[CLM]", "[S2S]", "[NLU]")] == [201, 202, 203]
    assert tok.sentinel_id(0) == tok.vocab_size - 1 == 213
    assert [tok.sentinel_id(j) for j in range(10)] == list(range(213, 203, -1))
    with pytest.raises(ValueError, match="sentinel"):
        tok.sentinel_id(10)
    with pytest.raises(ValueError, match="mode token"):
        tok.mode_id("[XYZ]")


def test_encode_decode_round_trip(tok: Ul2Tokenizer, corpus: Path) -> None:
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:20]]
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.sp_vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(texts[:3]) == [tok.encode(t) for t in texts[:3]]
    ids = tok.encode(texts[0])[:3]
    shown = tok.decode([tok.bos_id, *ids, tok.sep_id, tok.sentinel_id(0), tok.mode_id("[NLU]"),
                        tok.eos_id, tok.pad_id])
    assert shown == tok.decode(ids) + "[SEP]<extra_id_0>[NLU]"
    assert tok.id_to_token(tok.sentinel_id(7)) == "<extra_id_7>"


def test_cached_model_is_reused_not_retrained(tok: Ul2Tokenizer, corpus: Path) -> None:
    assert tok.trained
    cache = tok.model_file.parent
    mtime = tok.model_file.stat().st_mtime_ns
    again = Ul2Tokenizer.train_or_load(str(corpus), cache, config=CFG, num_sentinels=10)
    assert not again.trained and again.model_file == tok.model_file
    assert tok.model_file.stat().st_mtime_ns == mtime
    bpe = Ul2Tokenizer.train_or_load(str(corpus), cache, config=SpmTrainConfig(
        vocab_size=200, byte_fallback=False, model_type="bpe", input_sentence_size=2000, seed=3))
    assert bpe.trained and bpe.model_file != tok.model_file  # params are in the cache key
    assert len(list(cache.glob("*.model"))) == 2 and not list(cache.glob("*.tmp-*"))


def test_training_is_deterministic(tok: Ul2Tokenizer, corpus: Path, tmp_path: Path) -> None:
    other = Ul2Tokenizer.train_or_load(str(corpus), tmp_path, config=CFG, num_sentinels=10)
    assert other.trained
    pieces = [tok.id_to_token(i) for i in range(tok.sp_vocab_size)]
    assert pieces == [other.id_to_token(i) for i in range(other.sp_vocab_size)]
    assert other.model_file.name == tok.model_file.name  # same content + params -> same key


def test_changed_corpus_changes_the_key(tok: Ul2Tokenizer, tmp_path: Path) -> None:
    changed = write_corpus(tmp_path / "c.jsonl", seed=1)
    other = Ul2Tokenizer.train_or_load(str(changed), tok.model_file.parent, config=CFG)
    assert other.trained and other.model_file != tok.model_file
    assert other.num_sentinels == 100 and other.sentinel_id(0) == other.vocab_size - 1


def test_bad_configs_are_value_errors(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        SpmTrainConfig(vocab_size=200)  # byte_fallback needs > 256 pieces
    with pytest.raises(ValueError, match="model_type"):
        SpmTrainConfig(model_type="wordpiece")
    with pytest.raises(ValueError, match="vocab_size"):  # corpus too small for 5000 pieces
        Ul2Tokenizer.train_or_load(str(corpus), tmp_path, config=SpmTrainConfig(
            vocab_size=5000, byte_fallback=False, input_sentence_size=2000))
    with pytest.raises(ValueError, match="does not exist"):
        Ul2Tokenizer(tmp_path / "missing.model")


def test_sample_sentences_is_capped_seeded_and_ordered() -> None:
    docs = [f"line {i}\n\nmore {i}" for i in range(100)]
    a = sample_sentences(docs, size=30, seed=0)
    assert len(a) == 30 and a == sample_sentences(docs, size=30, seed=0)
    assert a != sample_sentences(docs, size=30, seed=1)
    order = [(int(s.split()[1]), s.startswith("more")) for s in a]
    assert order == sorted(order)  # kept in corpus order
    assert sample_sentences(docs, size=1000, seed=0)[:2] == ["line 0", "more 0"]
