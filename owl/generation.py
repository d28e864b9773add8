"""Streaming generation for one request, as small functions: prefill, decode one token, stream text.

``stream_generate`` yields text deltas as tokens arrive (decoding the whole answer so far each
time, since SentencePiece pieces only become text in context); ``generate`` joins the stream.
The serving engine (``owl.engine``) batches many requests with the same building blocks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from owl.errors import ContextLengthError
from owl.sampling import GenerationParams, TokenHistory, choose, make_generator


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    tokens: list[int] = field(default_factory=list)  # the answer's token ids


def check_context(prompt_tokens: int, max_positions: int | None, max_new_tokens: int) -> int:
    """The number of new tokens that fit: the request's budget, cut at the end of the context.

    A prompt that leaves no room for a single new token is an error.
    """
    if max_positions is None:
        return max_new_tokens
    if prompt_tokens >= max_positions:
        raise ContextLengthError(
            f"the prompt is {prompt_tokens} tokens, image slots included, but the model's "
            f"context is {max_positions} tokens; remove images or earlier turns, or shorten the text"
        )
    return min(max_new_tokens, max_positions - prompt_tokens)


class TextStream:
    """Turns tokens into text deltas; stop strings are held back until decided.

    Decoding is incremental: each new token decodes only a short window that starts one
    token before the last released text (SentencePiece strips the leading space of a
    string's first piece, so the window is decoded twice from the same start and only the
    difference is new). A delta never ends inside a multi-byte character, and text that
    could still turn into a stop string waits until it cannot.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into text

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self._prefix : self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.tokens[self._prefix :], skip_special_tokens=True)
        if after.endswith("\ufffd"):
            return ""  # an incomplete character: wait for its remaining bytes
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self.tokens)
        for stop in self.stop:
            found = self.text.find(stop)
            if found != -1:
                self.stopped = True
                self.text = self.text[:found]
                return self._release(len(self.text))
        return self._release(self.emitted + self._stop_free_length(self.text[self.emitted :]))

    def finish(self) -> str:
        """Whatever is still held back, once generation has ended."""
        if self._read < len(self.tokens) and not self.stopped:
            tail = self.tokenizer.decode(self.tokens[self._prefix :], skip_special_tokens=True)
            head = self.tokenizer.decode(self.tokens[self._prefix : self._read], skip_special_tokens=True)
            self.text += tail[len(head) :]
            self._read = len(self.tokens)
        return self._release(len(self.text))

    def _stop_free_length(self, pending: str) -> int:
        """How much of ``pending`` cannot begin a stop string that later tokens might complete."""
        for start in range(len(pending)):
            tail = pending[start:]
            if any(stop.startswith(tail) for stop in self.stop):
                return start
        return len(pending)

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta


@torch.inference_mode()
def prefill(model, embeds: torch.Tensor, cache) -> torch.Tensor:
    """Run the prompt embeddings (1, L, H) through the LLM; the last position's logits (1, V)."""
    out = model.language_model(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


@torch.inference_mode()
def decode_one_token(model, token: int, position: int, cache) -> torch.Tensor:
    """One step from the previous token; the logits (1, V) for the next."""
    ids = torch.tensor([[token]], device=model.device)
    embeds = model.embed_text(ids)
    positions = torch.tensor([[position]], device=model.device)
    out = model.language_model(inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True)
    return out.logits[:, -1]


def stream_generate(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    pixel_values: torch.Tensor | None,
    params: GenerationParams,
    *,
    cancel: threading.Event | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Yield the answer's text as it is generated.

    ``prompt_ids`` come from ``owl.processing.encode_prompt``; ``pixel_values`` holds one image per
    placeholder, in order. Generation ends at EOS, a stop string, the token budget, the end of the
    context, or when ``cancel`` is set.
    """
    from transformers import DynamicCache

    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    budget = check_context(len(prompt_ids), model.config.max_positions, params.max_new_tokens)
    generator = make_generator(params)
    with torch.inference_mode():
        image_embeds = None
        if pixel_values is not None and pixel_values.numel():
            image_embeds = model.encode_images(pixel_values)
        ids = torch.tensor([list(prompt_ids)], device=model.device)
        cache = DynamicCache(config=model.language_model.config)
        logits = prefill(model, model.embed(ids, image_embeds), cache)
    # The releases' outputs began with BOS, which repetition penalties therefore saw too.
    history = TokenHistory([tokenizer.bos_token_id])
    text = TextStream(tokenizer, params.stop)
    position = len(prompt_ids)
    stats.finish_reason = "length"
    for _ in range(budget):
        if cancel is not None and cancel.is_set():
            stats.finish_reason = "cancelled"
            break
        token = choose(logits, [params], [history], [generator])[0]
        if token == tokenizer.eos_token_id and not params.ignore_eos:
            stats.finish_reason = "stop"
            break
        history.append(token)
        stats.tokens.append(token)
        stats.completion_tokens += 1
        delta = text.push(token)
        if delta:
            yield delta
        if text.stopped:
            stats.finish_reason = "stop"
            break
        if stats.completion_tokens == budget:
            break
        logits = decode_one_token(model, token, position, cache)
        position += 1
    rest = text.finish()
    if rest:
        yield rest


def generate(model, tokenizer, prompt_ids, pixel_values, params: GenerationParams, **kwargs) -> str:
    """The whole answer at once: the join of ``stream_generate``."""
    return "".join(stream_generate(model, tokenizer, prompt_ids, pixel_values, params, **kwargs))
