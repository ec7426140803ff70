"""Document readers (txt / jsonl / parquet / directory / save_to_disk) and the demo corpus."""

import json
from pathlib import Path

import pytest

from lag_ds.data.corpus import build_demo_corpus, iter_documents, resolve_source, source_fingerprint


def test_txt_blocks_are_documents(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("first line\n  indented\n\n\n   \nsecond doc\n\nthird\n", encoding="utf-8")
    assert list(iter_documents(str(p))) == ["first line\n  indented", "second doc", "third"]


def test_jsonl_field_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "one", "body": "x"}\n\n{"text": "  "}\n{"text": "two", "body": "y"}\n')
    assert list(iter_documents(str(p))) == ["one", "two"]  # blank documents dropped
    with pytest.raises(ValueError, match=r"a\.jsonl:1: no field 'content'"):
        list(iter_documents(str(p), text_field="content"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        list(iter_documents(str(bad)))


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2", ""], "n": [1, 2, 3]}), tmp_path / "x.parquet")
    assert list(iter_documents(str(tmp_path / "x.parquet"))) == ["p1", "p2"]
    with pytest.raises(ValueError, match="no column 'body'"):
        list(iter_documents(str(tmp_path / "x.parquet"), text_field="body"))


def test_directory_reads_supported_files_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("b1\n\nb2\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "a1"}) + "\n")
    (tmp_path / "sub" / "c.txt").write_text("c1\n")
    (tmp_path / "README.md").write_text("ignored\n")
    assert list(iter_documents(str(tmp_path))) == ["a1", "b1", "b2", "c1"]
    fp = source_fingerprint(str(tmp_path))
    assert fp == source_fingerprint(str(tmp_path))
    (tmp_path / "sub" / "c.txt").write_text("c2\n")
    assert source_fingerprint(str(tmp_path)) != fp  # content-keyed


def test_saved_hf_dataset(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": ["h1", "h2"]}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(str(tmp_path / "ds"))) == ["h1", "h2"]


def test_unknown_or_missing_sources_raise_naming_them(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="nope.jsonl"):
        iter_documents(missing)  # eager: raised before iteration
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"x\.csv.*unsupported"):
        iter_documents(str(tmp_path / "x.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        iter_documents(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="hf:NAME"):
        iter_documents("hf:")
    with pytest.raises(ValueError, match="demo"):
        iter_documents("demo")


def test_demo_corpus_is_capped_deterministic_and_reused(tmp_path: Path) -> None:
    a = build_demo_corpus(tmp_path / "a", max_bytes=150_000)
    lines = a.read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line)["text"] for line in lines]
    assert len(docs) >= 5 and all(isinstance(d, str) and d.strip() for d in docs)
    assert sum(len(d.encode()) for d in docs) <= 150_000
    assert any('"""' in d for d in docs)  # stdlib sources with their docstrings
    mtime = a.stat().st_mtime_ns
    assert build_demo_corpus(tmp_path / "a", max_bytes=150_000) == a
    assert a.stat().st_mtime_ns == mtime  # reused, not rebuilt
    b = build_demo_corpus(tmp_path / "b", max_bytes=150_000)
    assert b.read_bytes() == a.read_bytes()
    smaller = build_demo_corpus(tmp_path / "a", max_bytes=60_000)  # params changed: rebuilt
    assert smaller.stat().st_size < 70_000
    assert resolve_source("demo", tmp_path / "c", demo_max_bytes=60_000).endswith(
        "demo_corpus.jsonl")
    assert resolve_source("x.txt", tmp_path) == "x.txt"
    assert not list((tmp_path / "a").glob("*.tmp-*"))
