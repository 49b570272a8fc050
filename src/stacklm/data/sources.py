"""Document sources: the default corpus, text files, directories, globs, JSONL, Parquet, HF datasets.

Unusable input (a binary file, undecodable bytes, a malformed JSONL line, an empty document) is
skipped and counted; `read_documents` fails with a UserError only when nothing usable remains.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stacklm.errors import UserError

DEFAULT_SUFFIXES = (".py",)


@dataclass
class Document:
    text: str
    digest: bytes  # blake2b of the UTF-8 text: the split and the caches key on it
    n_bytes: int


@dataclass
class ReadReport:
    documents: int = 0
    bytes: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)

    def summary(self, source: str) -> str:
        line = f"data {source}: {self.documents} documents, {self.bytes / 1e6:.1f} MB"
        if self.skipped:
            line += "; skipped " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return line


def default_corpus_files() -> list[Path]:
    """The running interpreter's standard-library sources (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(DEFAULT_SUFFIXES)]
    return files


def expand_source(source: str) -> list[Path]:
    if source == "default":
        return default_corpus_files()
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if glob.has_magic(source):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        matches = [p for p in matches if p.is_file()]
        if not matches:
            raise UserError(f"data.source: the glob {source!r} matches no files")
        return matches
    raise UserError(f"data.source: {source!r} does not exist (give 'default', a file, a directory, "
                    f"a glob, or hf:NAME)")


def make_document(text: str) -> Document:
    raw = text.encode("utf-8")
    return Document(text, hashlib.blake2b(raw, digest_size=16).digest(), len(raw))


def read_text_file(path: Path, report: ReadReport) -> Iterator[str]:
    try:
        raw = path.read_bytes()
    except OSError:
        report.skipped["unreadable files"] += 1
        return
    if b"\x00" in raw[:8192]:
        report.skipped["binary files"] += 1
        return
    try:
        yield raw.decode("utf-8")
    except UnicodeDecodeError:
        report.skipped["undecodable files"] += 1


def read_jsonl(path: Path, text_field: str, report: ReadReport) -> Iterator[str]:
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                report.skipped["malformed JSONL lines"] += 1
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                report.skipped[f"JSONL lines without a string {text_field!r}"] += 1
                continue
            yield text


def read_parquet(path: Path, text_field: str, report: ReadReport) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow (pip install 'stacklm[parquet]')") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    if text_field not in table.schema_arrow.names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}); "
                        f"set data.text_field")
    for batch in table.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield text
            else:
                report.skipped["Parquet rows without text"] += 1


def read_hf_dataset(spec: str, text_field: str, report: ReadReport) -> Iterator[str]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise UserError("data.source hf:... needs the `datasets` package (pip install 'stacklm[datasets]')") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # the datasets library raises many types; the user needs the message
        raise UserError(f"data.source hf:{spec}: cannot load the dataset ({e})") from None
    for record in ds:
        text = record.get(text_field)
        if isinstance(text, str):
            yield text
        else:
            report.skipped[f"records without a string {text_field!r}"] += 1


def iter_texts(source: str, text_field: str, report: ReadReport) -> Iterator[str]:
    if source.startswith("hf:"):
        yield from read_hf_dataset(source[3:], text_field, report)
        return
    for path in expand_source(source):
        suffix = "".join(path.suffixes[-1:]).lower()
        if suffix == ".jsonl":
            yield from read_jsonl(path, text_field, report)
        elif suffix == ".parquet":
            yield from read_parquet(path, text_field, report)
        else:
            yield from read_text_file(path, report)


def read_documents(source: str, text_field: str = "text", max_bytes: int | None = None) -> tuple[list[Document], ReadReport]:
    """All usable documents of `source` (up to max_bytes of text) and a report of what was skipped."""
    report = ReadReport()
    docs = []
    for text in iter_texts(source, text_field, report):
        if not text.strip():
            report.skipped["empty documents"] += 1
            continue
        doc = make_document(text)
        docs.append(doc)
        report.documents += 1
        report.bytes += doc.n_bytes
        if max_bytes is not None and report.bytes >= max_bytes:
            break
    if not docs:
        detail = f" (skipped {', '.join(f'{n} {w}' for w, n in report.skipped.items())})" if report.skipped else ""
        raise UserError(f"data.source {source!r}: no usable text{detail}")
    return docs, report
