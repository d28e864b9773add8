"""ZeroGPU mode: each request generates in its own thread (inside @spaces.GPU on a Space)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from owl.engine import EngineSettings
from owl.errors import QueueFullError
from owl.generation import GenerationStats, stream_generate
from owl.params import GenerationParams
from owl.processing import encode_prompt
from owl.zerogpu import DirectEngine, on_zero_gpu


@pytest.fixture(scope="module")
def loaded(tiny_loaded):
    return tiny_loaded


def request(loaded, seed):
    ids = encode_prompt(f"Human: <image>\nHuman: question {seed}\nAI: ", loaded.tokenizer, 9)
    return ids, torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def test_detected_from_the_space_environment():
    assert on_zero_gpu({"SPACES_ZERO_GPU": "true"})
    assert not on_zero_gpu({})


def test_answers_equal_the_library_stream(loaded):
    params = GenerationParams(max_new_tokens=20, ignore_eos=True)
    ids, pixels = request(loaded, 1)
    stats = GenerationStats()
    expected = "".join(stream_generate(loaded.model, loaded.tokenizer, ids, pixels, params, stats=stats))
    with DirectEngine(loaded) as engine:
        handle = engine.submit(ids, pixels, params)
        assert handle.text() == expected
        assert handle.stats.tokens == stats.tokens and handle.stats.finish_reason == "length"
        status = engine.status()
        assert status["requests_completed"] == 1 and status["layers"] == "transformers"  # /health reads it


def test_cancel_stops_between_tokens(loaded):
    with DirectEngine(loaded) as engine:
        handle = engine.submit(*request(loaded, 2), GenerationParams(max_new_tokens=500, ignore_eos=True))
        stream = iter(handle)
        next(stream)
        handle.cancel()
        list(stream)
        assert handle.stats.finish_reason == "cancelled" and handle.stats.completion_tokens < 500


def test_async_stream_and_bounded_in_flight(loaded):
    async def consume(engine):
        handle = engine.submit(*request(loaded, 3), GenerationParams(max_new_tokens=8, ignore_eos=True))
        return [delta async for delta in handle]

    with DirectEngine(loaded, EngineSettings(queue_size=0)) as engine:
        assert asyncio.run(consume(engine))
        first = engine.submit(*request(loaded, 4), GenerationParams(max_new_tokens=400, ignore_eos=True))
        with pytest.raises(QueueFullError, match="1 requests are in flight"):
            engine.submit(*request(loaded, 5), GenerationParams(max_new_tokens=4))
        first.cancel()
        first.done.wait(5)
