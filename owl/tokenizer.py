"""Tokenizers: SentencePiece for LLaMA checkpoints, transformers' fast tokenizer for BLOOM.

The releases were trained with the slow SentencePiece tokenizer applied to each text chunk, so
for ``tokenizer.model`` we call ``sentencepiece`` directly: our ids are by construction what
SentencePiece produces, with no converter in between.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """No usable tokenizer; the message says what to pass."""


class Tokenizer(Protocol):
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def __len__(self) -> int: ...


class SentencePieceTokenizer:
    """LLaMA's tokenizer: ``<unk>``=0, ``<s>``=1, ``</s>``=2; padding uses ``<unk>`` as the releases do."""

    def __init__(self, model_file: str | Path):
        import sentencepiece

        self.path = Path(model_file)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        if self.sp.get_piece_size() == 0:
            raise TokenizerError(f"{self.path} holds an empty SentencePiece model")
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.unk_token_id = self.sp.unk_id()
        self.pad_token_id = self.unk_token_id
        self._special = {i for i in (self.bos_token_id, self.eos_token_id, self.unk_token_id) if i >= 0}

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS/EOS, exactly as ``SentencePieceProcessor.encode`` gives them."""
        return self.sp.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special]
        return self.sp.decode(list(ids))

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    # The original interface returned a transformers tokenizer; these keep such calls working.
    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        ids = self.encode(text)
        if add_special_tokens:
            ids = [self.bos_token_id, *ids]
        return {"input_ids": ids}


class HFTokenizer:
    """transformers' tokenizer (BLOOM's ``tokenizer.json``) behind the same small interface."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        self.path = Path(folder)
        self.hf = AutoTokenizer.from_pretrained(str(folder))
        self.bos_token_id = self.hf.bos_token_id
        self.eos_token_id = self.hf.eos_token_id
        self.pad_token_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return len(self.hf)


def load_tokenizer(path: str | Path) -> SentencePieceTokenizer | HFTokenizer:
    """A ``tokenizer.model`` file, or a folder holding ``tokenizer.model`` or ``tokenizer.json``."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            return HFTokenizer(path.parent)
        return SentencePieceTokenizer(path)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(path / "tokenizer.model")
    if (path / "tokenizer.json").is_file():
        return HFTokenizer(path)
    raise TokenizerError(
        f"no tokenizer at {path}: expected a tokenizer.model file or a folder holding tokenizer.model "
        "or tokenizer.json; pass --tokenizer PATH"
    )


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258 (ids above print as ``<id>``): for models with random weights.

    Random weights have no tokenizer of their own; this one lets benchmarks and tests run the
    whole text path without shipping a vocabulary. Their answers are noise either way.
    """

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0
    offset = 3

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [self.offset + byte for byte in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            if i < self.offset:
                continue
            if i < self.offset + 256:
                out.append(i - self.offset)
            else:
                out += f"<{i}>".encode()
        return out.decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size
