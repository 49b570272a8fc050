"""From `data.source` to a tokenizer and train/validation token stores, cached by content hash."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from stacklm.data.sources import Document, ReadReport, make_document, read_documents
from stacklm.data.store import TokenStore
from stacklm.data.tokenizer import Tokenizer

CACHE_VERSION = b"stacklm-data-1"
ENCODE_BATCH = 256


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: TokenStore | None
    val: TokenStore
    report: ReadReport


def is_validation(doc: Document, val_fraction: float) -> bool:
    return int.from_bytes(doc.digest[:8], "little") / 2**64 < val_fraction


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic split by document hash. A corpus too small to put any document in validation
    gives up its lowest-hash document; a single document is cut at a line boundary instead."""
    if len(docs) == 1:
        text = docs[0].text
        at = int(len(text) * (1 - val_fraction))
        cut = text.rfind("\n", 0, at) + 1 or at
        return [make_document(text[:cut])], [make_document(text[cut:])]
    train = [d for d in docs if not is_validation(d, val_fraction)]
    val = [d for d in docs if is_validation(d, val_fraction)]
    if not val:
        first = min(docs, key=lambda d: d.digest)
        train, val = [d for d in docs if d is not first], [first]
    if not train:
        train, val = val[1:], val[:1]
    return train, val


def content_key(docs: list[Document], *extra: object) -> str:
    h = hashlib.blake2b(CACHE_VERSION, digest_size=12)
    for d in docs:
        h.update(d.digest)
    for x in extra:
        h.update(repr(x).encode())
    return h.hexdigest()


def tokenizer_sample(docs: list[Document], max_bytes: int) -> list[str]:
    """Every k-th document, so a sample of max_bytes still spans the whole corpus."""
    total = sum(d.n_bytes for d in docs)
    step = max(1, total // max_bytes)
    sample, size = [], 0
    for d in docs[::step]:
        sample.append(d.text)
        size += d.n_bytes
        if size >= max_bytes:
            break
    return sample


def load_or_train_tokenizer(train_docs: list[Document], data_cfg, vocab_size: int, cache: Path,
                            log: Callable[[str], None]) -> Tokenizer:
    key = content_key(train_docs, vocab_size, data_cfg.sentinel_tokens, data_cfg.tokenizer_train_bytes)
    path = cache / "tokenizers" / f"{key}.json"
    if path.exists():
        return Tokenizer.load(path)
    log(f"training a {vocab_size}-token byte-level BPE on up to "
        f"{data_cfg.tokenizer_train_bytes / 1e6:.1f} MB of text")
    tok = Tokenizer.train(tokenizer_sample(train_docs, data_cfg.tokenizer_train_bytes), vocab_size,
                          data_cfg.sentinel_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tok.save(tmp)
    os.replace(tmp, path)
    return tok


def load_or_tokenize(docs: list[Document], tok: Tokenizer, cache: Path, name: str,
                     progress: bool) -> TokenStore:
    key = content_key(docs, tok.hf.to_str())
    directory = cache / "shards" / key / name
    if (directory / "meta.json").exists():
        return TokenStore(directory)
    bar = tqdm(total=sum(d.n_bytes for d in docs), unit="B", unit_scale=True,
               desc=f"tokenising {name}", disable=not progress, leave=False)

    def encoded():
        for i in range(0, len(docs), ENCODE_BATCH):
            batch = docs[i : i + ENCODE_BATCH]
            for doc, ids in zip(batch, tok.encode_batch([d.text for d in batch]), strict=True):
                yield ids, doc.n_bytes
            bar.update(sum(d.n_bytes for d in batch))

    store = TokenStore.write(directory, encoded(), tok.eos_id, tok.vocab_size)
    bar.close()
    return store


def prepare_data(data_cfg, vocab_size: int, tokenizer: Tokenizer | None = None, split: bool = True,
                 progress: bool = True, log: Callable[[str], None] = print) -> PreparedData:
    """Read `data_cfg.source`, then load or train the tokenizer and load or write token shards.

    With split=False every document goes to `val` (for evaluating a trained model on a source).
    """
    cache = Path(data_cfg.cache_dir).expanduser()
    docs, report = read_documents(data_cfg.source, data_cfg.text_field, data_cfg.max_bytes)
    log(report.summary(data_cfg.source))
    train_docs, val_docs = split_documents(docs, data_cfg.val_fraction) if split else ([], docs)
    if tokenizer is None:
        tokenizer = load_or_train_tokenizer(train_docs, data_cfg, vocab_size, cache, log)
    train = load_or_tokenize(train_docs, tokenizer, cache, "train", progress) if train_docs else None
    val = load_or_tokenize(val_docs, tokenizer, cache, "val", progress)
    return PreparedData(tokenizer, train, val, report)
