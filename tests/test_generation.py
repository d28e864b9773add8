"""Streaming generation: deterministic greedy, stream = whole answer, stop strings, limits, sampling."""

from __future__ import annotations

import threading

import pytest
import torch

from owl.generation import ContextLengthError, GenerationStats, TextStream, generate, stream_generate
from owl.sampling import (
    GenerationParams,
    Histories,
    ParameterError,
    TokenHistory,
    apply_no_repeat_ngram,
    apply_repetition_penalty,
    choose,
    make_generator,
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


def test_penalties_match_transformers_for_every_row_of_a_batch():
    """One batched call over rows with their own histories, penalties and n-gram sizes equals
    transformers' processors applied to each row alone."""
    from transformers.generation.logits_process import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    rng = torch.Generator().manual_seed(1)
    vocab = 12  # few tokens: histories repeat n-grams often
    for trial in range(20):
        rows = 5
        history = [
            torch.randint(vocab, (int(torch.randint(0, 60, (1,), generator=rng)),), generator=rng).tolist()
            for _ in range(rows)
        ]
        history[0] = [1, 4, 5, 4, 5, 9, 4]
        penalties = [(1.0, 1.3, 0.8)[(trial + row) % 3] for row in range(rows)]
        sizes = [(trial + row) % 4 for row in range(rows)]  # 0 (off) to 3
        logits = torch.randn(rows, vocab, generator=rng) * 3
        ours = logits.clone()
        apply_repetition_penalty(ours, [TokenHistory(h) for h in history], penalties)
        apply_no_repeat_ngram(ours, [TokenHistory(h) for h in history], sizes)
        for row, seen in enumerate(history):
            expected = logits[row : row + 1].clone()
            row_ids = torch.tensor([seen], dtype=torch.long)
            if penalties[row] != 1.0 and seen:
                expected = RepetitionPenaltyLogitsProcessor(penalties[row])(row_ids, expected)
            if sizes[row]:
                expected = NoRepeatNGramLogitsProcessor(sizes[row])(row_ids, expected)
            assert torch.equal(ours[row : row + 1], expected), (trial, row, seen, penalties[row], sizes[row])


def test_penalties_on_the_device_path_equal_the_sparse_one():
    """(B, V) masks (what a GPU runs, no read-back) and the sparse writes (a CPU's) agree exactly,
    also over histories extended on the device."""
    rng = torch.Generator().manual_seed(4)
    history = [torch.randint(9, (n,), generator=rng).tolist() for n in (0, 1, 7, 30, 55)]
    histories = Histories(history, "cpu", room=3)
    histories.append(torch.tensor([3, 3, 5, 1, 8]))
    extended = [[*h, t] for h, t in zip(history, [3, 3, 5, 1, 8], strict=True)]
    assert histories.host_lengths == [len(h) for h in extended]
    for sizes, penalties in [([2, 2, 2, 2, 2], [1.3] * 5), ([0, 1, 2, 3, 4], [1.0, 0.7, 1.2, 1.0, 2.0])]:
        logits = torch.randn(5, 9, generator=rng) * 3
        sparse, dense, reference = logits.clone(), logits.clone(), logits.clone()
        for out, history_form, is_dense in (
            (sparse, histories, False),
            (dense, histories, True),
            (reference, extended, False),
        ):
            apply_repetition_penalty(out, history_form, penalties, dense=is_dense)
            apply_no_repeat_ngram(out, history_form, sizes, dense=is_dense)
        assert torch.equal(sparse, reference) and torch.equal(dense, reference)
        assert torch.isinf(reference).any()


def test_token_history_grows_and_reads_back():
    history = TokenHistory([1, 2])
    for token in range(3, 40):
        history.append(token)
    assert list(history) == list(range(1, 40)) and len(history) == 39
    assert history.tensor().tolist() == list(range(1, 40))


def test_sampling_follows_the_warped_distribution():
    """Tokens are drawn in proportion to their probability after top-k, and never outside it."""
    logits = torch.tensor([[2.0, 1.0, 0.0, 3.0, -1.0, 0.5, 2.5, -2.0]])
    params = GenerationParams(do_sample=True, top_k=4)
    kept = warp(logits, torch.ones(1), torch.full((1,), 4), torch.ones(1)).softmax(-1)[0]
    generator = torch.Generator().manual_seed(0)
    draws = 4000
    counts = torch.zeros(8)
    for _ in range(draws):
        counts[choose(logits, [params], [[1]], [generator])[0]] += 1
    assert counts[kept == 0].sum() == 0  # outside the top 4: never
    expected = kept * draws
    spread = (expected * (1 - kept)).sqrt()
    assert ((counts - expected).abs() <= 4.5 * spread + 1e-6).all(), (counts, expected)


def test_each_row_samples_from_its_own_generator_as_if_alone():
    """Mixed rows (greedy, sampled, penalised) in one call choose what each would choose alone."""
    rng = torch.Generator().manual_seed(2)
    params = [
        GenerationParams(),
        GenerationParams(do_sample=True, temperature=1.3, seed=1),
        GenerationParams(do_sample=True, top_k=3, top_p=0.9, no_repeat_ngram_size=2, seed=2),
        GenerationParams(do_sample=True, top_p=0.5, repetition_penalty=1.2, seed=3),
    ]
    together = [make_generator(p) for p in params]
    apart = [make_generator(p) for p in params]
    histories = [TokenHistory([1]) for _ in params]
    alone_histories = [[1] for _ in params]
    for _ in range(30):
        logits = torch.randn(len(params), 40, generator=rng) * 2
        batched = choose(logits, params, histories, together)
        single = [
            choose(logits[row : row + 1], [p], [alone_histories[row]], [apart[row]])[0]
            for row, p in enumerate(params)
        ]
        assert batched == single
        for row, token in enumerate(batched):
            histories[row].append(token)
            alone_histories[row].append(token)
    assert len({tuple(h) for h in alone_histories}) == len(params)
