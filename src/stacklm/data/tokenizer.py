"""Byte-level BPE tokenizer, trained with Hugging Face `tokenizers`.

Reserved ids come first: <eos>, <pad>, <mask>, the UL2 mode tokens [NLU] [NLG] [S2S], then the
span-corruption sentinels <extra_id_0> ... (T5's names), so later objectives find them in place.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from stacklm.errors import UserError

EOS, PAD, MASK = "<eos>", "<pad>", "<mask>"
MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
FILE_NAME = "tokenizer.json"


def special_tokens(n_sentinels: int) -> list[str]:
    return [EOS, PAD, MASK, *MODE_TOKENS, *(f"<extra_id_{i}>" for i in range(n_sentinels))]


class Tokenizer:
    """Text <-> token ids. Wraps a `tokenizers.Tokenizer` and names the reserved ids."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.eos_id = self._id(EOS)
        self.pad_id = self._id(PAD)

    def _id(self, token: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise UserError(f"tokenizer has no {token} token; was it trained by stacklm?")
        return i

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, n_sentinels: int) -> Tokenizer:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special_tokens(n_sentinels),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            min_frequency=2,
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise UserError(f"cannot load tokenizer {path}: {e}") from None

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def sentinel_id(self, i: int) -> int:
        return self._id(f"<extra_id_{i}>")

    @property
    def sentinel_ids(self) -> list[int]:
        """The ids of <extra_id_0>, <extra_id_1>, ... (all the reserved sentinels)."""
        ids = []
        while (i := self.hf.token_to_id(f"<extra_id_{len(ids)}>")) is not None:
            ids.append(i)
        return ids

    def token_id(self, token: str) -> int:
        """The id of a reserved token such as "[NLU]"; UserError if the tokenizer lacks it."""
        return self._id(token)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)
