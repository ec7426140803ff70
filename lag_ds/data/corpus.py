"""Where raw text comes from: an offline demo corpus and a reader for local / Hub corpora.

Why: pretraining must run on any machine, including ones with no network and no dataset on
disk, so there is a corpus that can be *built* from text every Python install carries: the
standard library's own ``.py`` sources (code plus their docstrings and comments). Real runs
point ``source`` at local files or a Hugging Face dataset instead; every form yields the same
thing, an iterator of document strings in a deterministic order.

Demo corpus (:func:`build_demo_corpus`), exact rules:

* files: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, sorted by relative POSIX
  path, skipping any path with a component in ``_DEMO_SKIP_DIRS`` (``site-packages``, test
  suites, ``__pycache__``) so the corpus does not depend on what is installed;
* one document per module: the file's full text (docstrings included), decoded as strict
  UTF-8; files that are not valid UTF-8 or are blank are skipped;
* size cap: files are taken in order while the running total of UTF-8 bytes stays
  ``<= max_bytes`` (default 8,000,000); a file that would overflow is skipped and later,
  smaller files may still fit;
* output ``<out_dir>/demo_corpus.jsonl`` (one ``{"text": ...}`` per line) and a sidecar
  ``demo_corpus.meta.json``; both are written to temp names and renamed, the sidecar last,
  so an existing corpus whose sidecar matches (``max_bytes``, stdlib path, Python version) is
  complete and is reused as is.

Source strings accepted by :func:`iter_documents`:

* ``path/to/file.txt``: one document per block of lines separated by blank (whitespace-only)
  lines; lines inside a block are kept verbatim and joined with ``"\\n"``;
* ``path/to/file.jsonl``: one JSON object per non-empty line, the document is
  ``obj[text_field]`` (default ``"text"``), which must be a string;
* ``path/to/file.parquet``: column ``text_field``, read in record batches with ``pyarrow``
  (the Arrow engine under ``datasets``; no Hugging Face cache is written);
* a directory saved with ``datasets.Dataset.save_to_disk`` (has ``dataset_info.json`` or,
  for a ``DatasetDict``, ``dataset_dict.json``, whose ``"train"`` split is used);
* any other directory: every ``.txt``/``.jsonl``/``.parquet`` file under it, recursively, in
  sorted relative-path order (files with other suffixes are ignored; none at all is an error);
* ``hf:NAME[:SPLIT]``: ``datasets.load_dataset(NAME, split=SPLIT or "train")``.

Documents that are empty after ``str.strip()`` are dropped by every reader.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from lag_ds.data.cache import atomic_write_text, file_lock, hash_files, hash_json, temp_path

DEMO_SOURCE = "demo"
DEMO_FILE = "demo_corpus.jsonl"
DEMO_META = "demo_corpus.meta.json"
_DEMO_FORMAT = 1
_DEMO_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests",
                             "idle_test", "test_data"})
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")


# ----------------------------------------------------------------------------- demo corpus


def _stdlib_modules(stdlib: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in _DEMO_SKIP_DIRS]
        rel_dir = Path(dirpath).relative_to(stdlib)
        files.extend(rel_dir / name for name in filenames if name.endswith(".py"))
    return sorted(files, key=lambda p: p.as_posix())


def build_demo_corpus(out_dir: Path, *, max_bytes: int = 8_000_000) -> Path:
    """Build (or reuse) the offline stdlib corpus in ``out_dir``; return the ``.jsonl`` path."""
    if max_bytes <= 0:
        raise ValueError(f"build_demo_corpus: max_bytes must be > 0, got {max_bytes}")
    out_dir = Path(out_dir)
    corpus, meta_path = out_dir / DEMO_FILE, out_dir / DEMO_META
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    want = {"format": _DEMO_FORMAT, "max_bytes": max_bytes, "stdlib": str(stdlib),
            "python": sys.version.split()[0]}
    with file_lock(out_dir / ".demo_corpus.lock"):
        if corpus.exists() and meta_path.exists():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if all(meta.get(k) == v for k, v in want.items()):
                return corpus
        if not stdlib.is_dir():
            raise ValueError(f"build_demo_corpus: stdlib directory {stdlib} does not exist")
        total, num_docs = 0, 0
        tmp = temp_path(corpus)
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for rel in _stdlib_modules(stdlib):
                    path = stdlib / rel
                    if total + path.stat().st_size > max_bytes:
                        continue
                    try:
                        text = path.read_bytes().decode("utf-8")
                    except UnicodeDecodeError:
                        continue
                    if not text.strip():
                        continue
                    f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                    total += len(text.encode("utf-8"))
                    num_docs += 1
            if num_docs == 0:
                raise ValueError(f"build_demo_corpus: no stdlib module fits in "
                                 f"max_bytes={max_bytes}")
            os.replace(tmp, corpus)
        finally:
            tmp.unlink(missing_ok=True)
        atomic_write_text(meta_path, json.dumps({**want, "documents": num_docs, "bytes": total}))
    return corpus


def resolve_source(source: str, cache_dir: Path, *, demo_max_bytes: int = 8_000_000) -> str:
    """Map ``"demo"`` to the demo corpus built under ``cache_dir/demo``; other sources unchanged."""
    if source == DEMO_SOURCE:
        return str(build_demo_corpus(Path(cache_dir) / "demo", max_bytes=demo_max_bytes))
    return source


# ----------------------------------------------------------------------------- readers


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _check_local(source: str) -> Path:
    path = Path(source)
    if not path.exists():
        raise ValueError(f"data source {source!r} does not exist (expected 'demo', "
                         f"'hf:NAME[:SPLIT]', a {'/'.join(FILE_SUFFIXES)} file or a directory)")
    if path.is_file() and path.suffix not in FILE_SUFFIXES:
        raise ValueError(f"data source {source!r}: unsupported file type {path.suffix!r} "
                         f"(supported: {', '.join(FILE_SUFFIXES)})")
    return path


def source_files(source: str) -> list[Path]:
    """The local files a source reads, in reading order (empty for ``hf:`` sources)."""
    if source.startswith("hf:"):
        return []
    path = _check_local(source)
    if path.is_file():
        return [path]
    if _is_saved_dataset(path):
        return sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.as_posix())
    files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise ValueError(f"data source {source!r}: directory has no "
                         f"{'/'.join(FILE_SUFFIXES)} files")
    return files


def source_fingerprint(source: str, *, text_field: str = "text") -> str:
    """Content hash of a source: bytes of its local files, or the spec for ``hf:`` sources.

    Hub datasets are keyed by name and split only (their revision is not pinned).
    """
    if source.startswith("hf:"):
        return hash_json({"hf": source, "field": text_field})
    path = _check_local(source)
    root = path if path.is_dir() else path.parent
    return hash_json({"files": hash_files(source_files(source), root=root), "field": text_field})


def _iter_txt(path: Path) -> Iterator[str]:
    block: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or text_field not in obj:
                raise ValueError(f"{path}:{lineno}: no field {text_field!r} (text_field)")
            text = obj[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} is "
                                 f"{type(text).__name__}, expected str")
            yield text


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (text_field); "
                         f"columns are {pf.schema_arrow.names}")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _iter_hf_dataset(ds: object, text_field: str, where: str) -> Iterator[str]:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{where}: DatasetDict has no 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    names = getattr(ds, "column_names", None)
    if names is not None and text_field not in names:
        raise ValueError(f"{where}: no column {text_field!r} (text_field); columns are {names}")
    for row in ds:  # type: ignore[attr-defined]
        yield row[text_field]


def _iter_raw(source: str, text_field: str) -> Iterator[str]:
    if source.startswith("hf:"):
        import datasets

        name, _, split = source[3:].partition(":")
        yield from _iter_hf_dataset(datasets.load_dataset(name, split=split or "train"),
                                    text_field, source)
        return
    path = Path(source)
    if path.is_dir() and _is_saved_dataset(path):
        import datasets

        yield from _iter_hf_dataset(datasets.load_from_disk(str(path)), text_field, source)
        return
    for file in source_files(source):
        if file.suffix == ".txt":
            yield from _iter_txt(file)
        elif file.suffix == ".jsonl":
            yield from _iter_jsonl(file, text_field)
        else:
            yield from _iter_parquet(file, text_field)


def iter_documents(source: str, *, text_field: str = "text") -> Iterator[str]:
    """Iterate the non-empty documents of ``source`` (see module docstring) in a fixed order.

    The source is validated eagerly: a missing path or unknown form raises ``ValueError`` here,
    not at the first ``next()``.
    """
    if source == DEMO_SOURCE:
        raise ValueError("data source 'demo' must first be resolved with resolve_source()")
    if source.startswith("hf:"):
        if not source[3:].partition(":")[0]:
            raise ValueError(f"data source {source!r}: expected 'hf:NAME[:SPLIT]'")
    else:
        source_files(source)  # raises for missing paths, bad suffixes, empty directories
    return (text for text in _iter_raw(source, text_field) if text.strip())
