"""Streaming generation: deterministic greedy, stream = whole answer, stop strings, limits, sampling."""

from __future__ import annotations

import threading

import pytest
import torch

from owl.generation import ContextLengthError, GenerationStats, TextStream, generate, stream_generate
from owl.sampling import (
    GenerationParams,
    ParameterError,
    apply_no_repeat_ngram,
    apply_repetition_penalty,
    warp,
)
from owl.tokenizer import ByteTokenizer

SLOTS = 9


def prompt(tokenizer, images: int = 1) -> list[int]:
    from owl.processing import encode_prompt

    return encode_prompt(
        "Human: " + "<image>" * images + "\nHuman: What colour is it?\nAI: ", tokenizer, SLOTS
    )


def pixels(n: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(3))


def test_greedy_is_deterministic_and_stream_joins_to_the_answer(tiny_model, tokenizer):
    params = GenerationParams(max_new_tokens=24)
    deltas = list(stream_generate(tiny_model, tokenizer, prompt(tokenizer), pixels(), params))
    assert len(deltas) > 3
    assert "".join(deltas) == generate(tiny_model, tokenizer, prompt(tokenizer), pixels(), params)
    assert generate(tiny_model, tokenizer, prompt(tokenizer), pixels(), params) == "".join(deltas)


def test_answer_depends_on_the_image(tiny_model, tokenizer):
    params = GenerationParams(max_new_tokens=12)
    first = generate(tiny_model, tokenizer, prompt(tokenizer), pixels(), params)
    other = generate(tiny_model, tokenizer, prompt(tokenizer), -pixels(), params)
    assert first != other


def test_seeded_sampling_repeats_and_seeds_differ(tiny_model, tokenizer):
    def sample(seed):
        params = GenerationParams(max_new_tokens=16, do_sample=True, temperature=1.5, seed=seed)
        return generate(tiny_model, tokenizer, prompt(tokenizer), pixels(), params)

    assert sample(1) == sample(1)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_top_k_one_sampling_is_greedy(tiny_model, tokenizer):
    greedy = generate(tiny_model, tokenizer, prompt(tokenizer), pixels(), GenerationParams(max_new_tokens=10))
    sampled = generate(
        tiny_model,
        tokenizer,
        prompt(tokenizer),
        pixels(),
        GenerationParams(max_new_tokens=10, do_sample=True, top_k=1, seed=5),
    )
    assert sampled == greedy


def test_cancel_stops_generation(tiny_model, tokenizer):
    cancel = threading.Event()
    stats = GenerationStats()
    received = []
    for delta in stream_generate(
        tiny_model,
        tokenizer,
        prompt(tokenizer),
        pixels(),
        GenerationParams(max_new_tokens=200),
        cancel=cancel,
        stats=stats,
    ):
        received.append(delta)
        cancel.set()
    assert stats.finish_reason == "cancelled"
    assert stats.completion_tokens <= 2


def test_prompt_longer_than_the_context_is_refused_with_numbers(tiny_model, tokenizer):
    ids = [1] + [5] * 300
    with pytest.raises(ContextLengthError, match="the prompt is 301 tokens.*context is 256 tokens"):
        generate(tiny_model, tokenizer, ids, None, GenerationParams())


def test_new_tokens_stop_at_the_end_of_the_context(tiny_model, tokenizer):
    stats = GenerationStats()
    ids = [1] + [5] * 250
    generate(tiny_model, tokenizer, ids, None, GenerationParams(max_new_tokens=50), stats=stats)
    assert stats.completion_tokens <= 5 and stats.finish_reason in ("length", "stop")


# --- text streaming ---------------------------------------------------------------------------------


def feed(stream: TextStream, text: str) -> list[str]:
    return [stream.push(ByteTokenizer.offset + byte) for byte in text.encode()]


def test_stop_string_is_held_back_and_cut():
    stream = TextStream(ByteTokenizer(300), stop=["\nHuman:"])
    deltas = feed(stream, "Red.\nHum")
    assert "".join(deltas) == "Red."  # "\nHum" could still become the stop string
    deltas += feed(stream, "an: next")
    assert stream.stopped
    assert "".join(deltas) + stream.finish() == "Red."


def test_false_start_of_a_stop_string_is_released():
    stream = TextStream(ByteTokenizer(300), stop=["STOP"])
    text = "".join(feed(stream, "a STOOL")) + stream.finish()
    assert text == "a STOOL" and not stream.stopped


def test_multibyte_characters_are_never_split():
    stream = TextStream(ByteTokenizer(300))
    deltas = feed(stream, "é日")
    assert [d for d in deltas if d] == ["é", "日"]


# --- parameters and processors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"do_sample": True, "temperature": 0}, "temperature must be above 0 when sampling"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be 0"),
        ({"repetition_penalty": 0}, "repetition_penalty must be above 0"),
    ],
)
def test_parameter_errors_name_the_parameter(kwargs, message):
    with pytest.raises(ParameterError, match=message):
        GenerationParams(**kwargs)


def test_unknown_generate_kwargs_are_named():
    with pytest.raises(ParameterError, match="unknown generation parameters: typical_p"):
        GenerationParams.from_kwargs(typical_p=0.5)


def test_warpers_match_transformers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.zeros(3, 1, dtype=torch.long)
    for temperature, top_k, top_p in [(0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 10, 0.5)]:
        expected = logits.clone()
        expected = TemperatureLogitsWarper(temperature)(ids, expected)
        if top_k:
            expected = TopKLogitsWarper(top_k)(ids, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(ids, expected)
        ours = warp(logits, torch.full((3,), temperature), torch.full((3,), top_k), torch.full((3,), top_p))
        assert torch.equal(torch.isinf(ours), torch.isinf(expected))
        assert torch.allclose(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)])


def test_penalties_match_transformers():
    from transformers.generation.logits_process import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1))
    history = [[1, 4, 5, 4, 5, 9, 4], [1, 7, 7, 3]]
    for row, seen in enumerate(history):
        row_ids = torch.tensor([seen])
        expected = RepetitionPenaltyLogitsProcessor(1.3)(row_ids, logits[row : row + 1].clone())
        expected = NoRepeatNGramLogitsProcessor(2)(row_ids, expected)
        ours = logits[row : row + 1].clone()
        apply_repetition_penalty(ours, [seen], [1.3])
        apply_no_repeat_ngram(ours, [seen], [2])
        assert torch.equal(ours, expected)
