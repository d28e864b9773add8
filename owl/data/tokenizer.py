"""Train a small LLaMA-style SentencePiece tokenizer on the synthetic conversations.

The settings follow LLaMA's ``tokenizer.model`` so that the rest of Owl treats ours exactly like the
real one: BPE with byte fallback (any character, including ones never seen in training, encodes as
``<0xNN>`` byte pieces), ``<unk>``/``<s>``/``</s>`` at ids 0/1/2 and no pad piece, digits split,
identity normalisation (no NFKC), whitespace kept as written, a dummy-prefix space.

Training lines mirror how the pipeline tokenises (spec B.6): each text is split at newlines (LLaMA
encodes a newline as the byte piece ``<0x0A>``, which byte fallback guarantees) and ``<image>`` is
removed, because image markers are cut out before SentencePiece ever sees the text.

CLI: ``python -m owl.data.tokenizer --data DIR/data.jsonl --out PATH --vocab-size V``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from owl.config import DEMO_SYSTEM, IMAGE_TOKEN, README_SYSTEM

logger = logging.getLogger(__name__)

# 3 special pieces + 256 byte pieces are always present; the synthetic domain then needs about 70
# characters and has room for about 800 merges (all its words whole), so 1000 pieces covers it.
NUM_RESERVED_PIECES = 3 + 256
DEFAULT_VOCAB_SIZE = 1000
# Fixed so training is reproducible; SentencePiece keeps the generator seed process-wide.
_SEED = 1234

# Lines every tokenizer is trained on, whatever the data: both system lines, the template words, and
# the digits (answers spell numbers out, but users type them; LLaMA has a piece per digit).
_SEED_LINES = (DEMO_SYSTEM, README_SYSTEM, "Human: ", "AI: ", "0 1 2 3 4 5 6 7 8 9")


class TokenizerError(ValueError):
    """Tokenizer training cannot succeed as asked; the message says what to change."""


def training_lines(texts: Iterable[str]) -> Iterator[str]:
    """The lines SentencePiece trains on: the fixed seed lines, then each text's non-empty lines."""
    yield from _SEED_LINES
    for text in texts:
        for line in text.replace(IMAGE_TOKEN, "").split("\n"):
            if line.strip():
                yield line


def trainer_options(vocab_size: int) -> dict[str, object]:
    """SentencePiece trainer settings (LLaMA's, apart from size and a single thread)."""
    return {
        "model_type": "bpe",
        "vocab_size": vocab_size,
        "byte_fallback": True,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": -1,
        "split_digits": True,
        "add_dummy_prefix": True,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "allow_whitespace_only_pieces": True,
        "character_coverage": 1.0,
        "max_sentence_length": 16384,
        # Determinism: one thread, no sentence sampling or shuffling, and a fixed seed.
        "num_threads": 1,
        "input_sentence_size": 0,
        "shuffle_input_sentence": False,
        # Quiet: errors only.
        "minloglevel": 2,
    }


def train_tokenizer(texts: Iterable[str], out_path: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Train on ``texts`` (full conversations) and write a SentencePiece model to ``out_path``.

    Deterministic: the same texts in the same order give a byte-identical model.
    """
    if vocab_size <= NUM_RESERVED_PIECES:
        raise TokenizerError(
            f"vocab_size {vocab_size} leaves no room for text pieces: byte fallback reserves "
            f"{NUM_RESERVED_PIECES} ids (3 special + 256 bytes); use at least {NUM_RESERVED_PIECES + 100}"
        )
    out_path = Path(out_path)
    model = io.BytesIO()
    spm.set_random_generator_seed(_SEED)
    started = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_lines(texts), model_writer=model, **trainer_options(vocab_size)
        )
    except RuntimeError as err:
        raise _explain(err, vocab_size) from err
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.getvalue())
    logger.info(
        "trained a %d-piece tokenizer in %.1f s: %s", vocab_size, time.perf_counter() - started, out_path
    )
    return out_path


def _explain(err: RuntimeError, vocab_size: int) -> Exception:
    """Turn SentencePiece's "Vocabulary size too high" into an error that says what to pass."""
    found = re.search(r"value <= (\d+)", str(err))
    if found is None:
        return err
    return TokenizerError(
        f"vocab_size {vocab_size} is more than this text can fill; pass --vocab-size {found.group(1)} or less "
        f"(or train on more varied text)"
    )


def read_jsonl_texts(path: str | Path) -> Iterator[str]:
    """The ``text`` field of each line of an mPLUG-Owl jsonl file."""
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "text" not in record:
                raise TokenizerError(f"{path}:{number} has no 'text' field; is this an mPLUG-Owl jsonl file?")
            yield record["text"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m owl.data.tokenizer", description="Train a LLaMA-style SentencePiece BPE tokenizer."
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="an mPLUG-Owl jsonl file (its 'text' fields)"
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write tokenizer.model")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        path = train_tokenizer(read_jsonl_texts(args.data), args.out, args.vocab_size)
    except TokenizerError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {path} ({args.vocab_size} pieces) in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
