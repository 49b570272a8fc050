import json

import pytest

from stacklm.data.sources import default_corpus_files, read_documents
from stacklm.errors import UserError


def test_default_corpus_is_the_stdlib_without_site_packages():
    files = default_corpus_files()
    assert len(files) > 500
    assert any(f.name == "collections" or f.parent.name == "collections" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_text_dir_glob_and_bad_files_are_counted(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# title\nbody\n")
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("  \n")
    docs, report = read_documents(str(tmp_path))
    assert sorted(d.text for d in docs) == ["# title\nbody\n", "hello world\n"]
    assert report.skipped == {"binary files": 1, "undecodable files": 1, "empty documents": 1}
    assert "skipped 1 binary files, 1 empty documents, 1 undecodable files" in report.summary("x")
    docs, _ = read_documents(str(tmp_path / "**" / "*.md"))
    assert [d.text for d in docs] == ["# title\nbody\n"]


def test_jsonl_skips_malformed_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "one"}), "{not json", json.dumps({"body": "x"}), json.dumps([1]),
             "", json.dumps({"text": "two", "meta": 1})]
    path.write_text("\n".join(lines) + "\n")
    docs, report = read_documents(str(path))
    assert [d.text for d in docs] == ["one", "two"]
    assert report.skipped["malformed JSONL lines"] == 1
    assert report.skipped["JSONL lines without a string 'text'"] == 2
    docs, _ = read_documents(str(path), text_field="body")
    assert [d.text for d in docs] == ["x"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a doc", None, "another"]}), tmp_path / "d.parquet")
    docs, report = read_documents(str(tmp_path / "d.parquet"))
    assert [d.text for d in docs] == ["a doc", "another"]
    with pytest.raises(UserError, match="no column 'body'"):
        read_documents(str(tmp_path / "d.parquet"), text_field="body")


def test_nothing_usable_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_documents(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="matches no files"):
        read_documents(str(tmp_path / "*.txt"))
    (tmp_path / "x.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match=r"no usable text \(skipped 1 binary files\)"):
        read_documents(str(tmp_path))


def test_max_bytes_stops_early():
    docs, report = read_documents("default", max_bytes=200_000)
    assert 200_000 <= report.bytes < 200_000 + max(d.n_bytes for d in docs)


def test_hf_datasets_source(monkeypatch):
    """hf:NAME[:split] goes through datasets.load_dataset (faked here: tests never download)."""
    import sys
    import types

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [{"text": "from the hub"}, {"text": None}, {"text": "another"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs, report = read_documents("hf:user/corpus:validation")
    assert calls == [("user/corpus", "validation")]
    assert [d.text for d in docs] == ["from the hub", "another"]
    assert report.skipped == {"records without a string 'text'": 1}
