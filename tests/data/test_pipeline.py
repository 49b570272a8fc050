import numpy as np
import pytest
import torch

from stacklm.config import Config
from stacklm.data import PackedLoader, prepare_data
from stacklm.data.pipeline import split_documents
from stacklm.data.sources import make_document
from stacklm.data.store import TokenStore
from stacklm.data.tokenizer import Tokenizer


def corpus(tmp_path, n=40):
    tmp_path.mkdir()
    for i in range(n):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i}: " + "lorem ipsum dolor sit amet " * (i + 5))
    return tmp_path


def data_config(source, cache, **extra):
    values = {"source": str(source), "cache_dir": str(cache), "sentinel_tokens": 4, "seq_len": 16, **extra}
    return Config.from_dict({"model": {"vocab_size": 300, "max_seq_len": 64}, "data": values}).data


def test_split_is_deterministic_and_by_content():
    docs = [make_document(f"text {i}") for i in range(500)]
    train, val = split_documents(docs, 0.1)
    assert 20 < len(val) < 80 and len(train) + len(val) == 500
    again_train, again_val = split_documents(list(reversed(docs)), 0.1)
    assert {d.text for d in val} == {d.text for d in again_val}
    train, val = split_documents([make_document("line\n" * 100)], 0.1)
    assert train[0].text + val[0].text == "line\n" * 100 and val[0].text


def test_shards_hold_documents_separated_by_eos(tmp_path):
    source = corpus(tmp_path / "src", n=5)
    cfg = data_config(source, tmp_path / "cache")
    data = prepare_data(cfg, 300, split=False, progress=False, log=lambda m: None)
    tokens = np.concatenate(data.val.shards)
    pieces = np.split(tokens, np.flatnonzero(tokens == data.tokenizer.eos_id) + 1)[:-1]
    texts = sorted(data.tokenizer.decode(p[:-1].tolist()) for p in pieces)
    assert texts == sorted(p.read_text() for p in source.iterdir())
    assert tokens.dtype == np.uint16
    assert data.val.n_bytes == sum(p.stat().st_size for p in source.iterdir())


def test_second_run_reuses_tokenizer_and_shards(tmp_path, monkeypatch):
    cfg = data_config(corpus(tmp_path / "src"), tmp_path / "cache")
    first = prepare_data(cfg, 300, progress=False, log=lambda m: None)

    def fail(*a, **k):
        raise AssertionError("cache miss")

    monkeypatch.setattr(Tokenizer, "train", fail)
    monkeypatch.setattr(TokenStore, "write", fail)
    second = prepare_data(cfg, 300, progress=False, log=lambda m: None)
    assert second.train.n_tokens == first.train.n_tokens
    assert second.tokenizer.hf.to_str() == first.tokenizer.hf.to_str()


def test_tokenizer_reserves_special_tokens(tmp_path):
    tok = Tokenizer.train(["some text to learn from"] * 10, 300, n_sentinels=4)
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    assert tok.sentinel_id(3) == 9
    assert tok.decode(tok.encode("héllo wörld\n\tx")) == "héllo wörld\n\tx"
    tok.save(tmp_path / "t.json")
    assert Tokenizer.load(tmp_path / "t.json").encode("some text") == tok.encode("some text")


def test_large_vocab_uses_uint32(tmp_path):
    store = TokenStore.write(tmp_path / "s", [([70000, 1, 2], 5)], eos_id=0, vocab_size=70001)
    assert store.shards[0].dtype == np.uint32 and store.shards[0].tolist() == [70000, 1, 2, 0]


def test_shards_split_at_the_size_limit(tmp_path):
    docs = [(list(range(1, 11)), 10) for _ in range(7)]
    store = TokenStore.write(tmp_path / "s", docs, eos_id=0, vocab_size=100, shard_tokens=25)
    assert len(store.shards) == 4 and store.n_tokens == 77
    loader = PackedLoader(store, seq_len=5, batch_size=2, shuffle=False)
    windows = [w for _ in range(4) for w in next(loader).tolist()]
    assert all(len(w) == 6 for w in windows)  # never crossing a shard boundary


def make_store(tmp_path, n=1000):
    return TokenStore.write(tmp_path / "s", [(list(range(1, n)), n)], eos_id=0, vocab_size=n + 1)


def test_loader_visits_every_window_once_per_epoch(tmp_path):
    store = make_store(tmp_path)
    loader = PackedLoader(store, seq_len=10, batch_size=9, seed=3)
    starts = [int(row[0]) for _ in range(11) for row in next(loader)]
    assert len(set(starts)) == 99 and loader.epoch == 0  # 99 windows of 10 (+1) tokens
    next(loader)
    assert loader.epoch == 1


def test_loader_resumes_exactly(tmp_path):
    store = make_store(tmp_path)
    a = PackedLoader(store, seq_len=10, batch_size=4, seed=1)
    for _ in range(30):
        next(a)
    b = PackedLoader(store, seq_len=10, batch_size=4, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(20):
        assert next(a).equal(next(b))


def test_ranks_partition_the_global_batch(tmp_path):
    store = make_store(tmp_path)
    whole = PackedLoader(store, seq_len=10, batch_size=6, seed=2)
    parts = [PackedLoader(store, seq_len=10, batch_size=3, seed=2, rank=r, world=2) for r in (0, 1)]
    for _ in range(25):
        assert next(whole).equal(torch.cat([next(p) for p in parts]))


def test_too_little_data_for_a_batch_is_a_clear_error(tmp_path):
    from stacklm.errors import UserError

    with pytest.raises(UserError, match="fewer than one batch"):
        PackedLoader(make_store(tmp_path, n=50), seq_len=10, batch_size=8)
