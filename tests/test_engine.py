"""The serving engine: stop, queue limits, batching that changes nothing, failures that stay local."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import replace

import pytest
import torch

from owl.engine import Engine, EngineSettings
from owl.errors import OutOfMemory, QueueFullError, RequestFailed, RequestTimeout, WorkerUnavailable
from owl.generation import GenerationStats, stream_generate
from owl.processing import encode_prompt
from owl.sampling import GenerationParams

LONG = GenerationParams(max_new_tokens=200, ignore_eos=True)
SHORT = GenerationParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tiny_loaded):
    return tiny_loaded


def request(loaded, seed: int, images: int = 1):
    ids = encode_prompt(
        "Human: " + "<image>" * images + f"\nHuman: question {seed}\nAI: ", loaded.tokenizer, 9
    )
    pixels = torch.randn(images, 3, 56, 56, generator=torch.Generator().manual_seed(seed)) if images else None
    return ids, pixels


def alone(loaded, ids, pixels, params) -> list[int]:
    stats = GenerationStats()
    list(stream_generate(loaded.model, loaded.tokenizer, ids, pixels, params, stats=stats))
    return stats.tokens


@pytest.mark.parametrize("static", [False, True], ids=["eager", "fixed-shape-pipelined"])
def test_stop_ends_generation_within_one_step_and_frees_the_slot(loaded, static):
    with Engine(loaded, EngineSettings(max_batch=1, queue_size=4, static_decode=static)) as engine:
        first = engine.submit(*request(loaded, 1), LONG)
        second = engine.submit(*request(loaded, 2), SHORT)
        stream = iter(first)
        for _ in range(3):
            next(stream)
        at_cancel = first.stats.completion_tokens
        first.cancel()
        assert list(stream) == [] or first.stats.completion_tokens <= at_cancel + 1
        assert first.done.wait(5) and first.stats.finish_reason == "cancelled"
        assert first.stats.completion_tokens <= at_cancel + 1
        assert second.text()  # the waiting request got the slot and finished
        assert second.stats.started >= first.stats.finished
        assert engine.status()["requests_cancelled"] == 1


def test_closing_the_stream_cancels_the_request(loaded):
    with Engine(loaded, EngineSettings(max_batch=2)) as engine:
        handle = engine.submit(*request(loaded, 3), LONG)
        stream = iter(handle)
        next(stream)
        stream.close()  # what a web framework does when the client disconnects
        assert handle.done.wait(5)
        assert handle.stats.finish_reason == "cancelled" and handle.stats.completion_tokens < 200


def test_full_queue_answers_at_once_with_the_queue_length(loaded):
    with Engine(loaded, EngineSettings(max_batch=1, queue_size=2)) as engine:
        handles = [engine.submit(*request(loaded, 10), LONG)]
        while handles[0].stats.started is None:
            threading.Event().wait(0.01)
        handles += [engine.submit(*request(loaded, i), LONG) for i in (11, 12)]
        with pytest.raises(QueueFullError, match="2 requests are already waiting"):
            engine.submit(*request(loaded, 13), LONG)
        assert handles[2].position() == 2
        for handle in handles:
            handle.cancel()
        assert engine.status()["requests_failed"] == {"queue_full": 1}


def test_pipelined_steps_give_the_same_answers_as_alone_while_the_batch_changes(loaded, monkeypatch):
    """Greedy fixed-shape steps start before the last one is read (on a GPU: while the CPU streams).

    Requests of different lengths finish at different steps, later ones join the running batch,
    one is cancelled mid-way and one ends at the very end of its context: every answer is still
    exactly the one it gets alone, and no token past a request's end is streamed.
    """
    from owl.cuda_graphs import DecodeGraphs

    followed = []
    follow = DecodeGraphs.follow
    monkeypatch.setattr(DecodeGraphs, "follow", lambda self, *a: followed.append(1) or follow(self, *a))
    requests = [request(loaded, seed, images=seed % 2) for seed in range(30, 36)]
    budgets = [5, 40, 17, 40, 9, 200]
    expected = [
        alone(loaded, ids, pixels, GenerationParams(max_new_tokens=n, ignore_eos=True))
        for (ids, pixels), n in zip(requests, budgets, strict=True)
    ]
    settings = EngineSettings(max_batch=3, queue_size=8, static_decode=True, max_seq_len=96)
    with Engine(loaded, settings) as engine:
        handles = [
            engine.submit(ids, pixels, GenerationParams(max_new_tokens=n, ignore_eos=True))
            for (ids, pixels), n in zip(requests, budgets, strict=True)
        ]
        cancelled = engine.submit(*request(loaded, 40), LONG)
        stream = iter(cancelled)
        next(stream)
        cancelled.cancel()
        texts = [h.text() for h in handles]
        assert cancelled.done.wait(5) and cancelled.stats.finish_reason == "cancelled"
    # The last request asked for more than its context holds: it ends at the context's end.
    room = 96 - len(requests[5][0])
    assert handles[5].stats.completion_tokens == room and expected[5][:room] == handles[5].stats.tokens
    assert [h.stats.tokens for h in handles[:5]] == expected[:5]
    assert [h.stats.completion_tokens for h in handles[:5]] == budgets[:5] and all(texts)
    assert followed  # the pipelined path really ran


def test_a_request_joins_and_another_stops_while_a_fixed_shape_step_is_in_flight(loaded):
    """Between pipelined steps one is always in flight; a request that arrives, or one stopped,
    while another is answering lands it from the worker's loop. The running answer goes on as
    it would alone (it used to fail: its token history, made for inference, was written outside it)."""
    params = GenerationParams(max_new_tokens=150, ignore_eos=True)
    first, second = request(loaded, 60), request(loaded, 61)
    expected = [alone(loaded, ids, pixels, params) for ids, pixels in (first, second)]
    settings = EngineSettings(max_batch=4, static_decode=True, max_seq_len=256)
    with Engine(loaded, settings) as engine:
        running = engine.submit(*first, params)
        stream = iter(running)
        next(stream), next(stream)  # it is answering, a step in flight
        joining = engine.submit(*second, params)
        joined = iter(joining)  # (a stream dropped unread stops its request: keep it)
        next(joined)
        stopped = engine.submit(*request(loaded, 62), LONG)
        next(iter(stopped))
        stopped.cancel()
        running.text(), joining.text()
        assert stopped.done.wait(5) and stopped.stats.finish_reason == "cancelled"
    assert running.stats.finish_reason == joining.stats.finish_reason == "length"
    assert [running.stats.tokens, joining.stats.tokens] == expected


def test_a_lone_prompt_on_an_idle_engine_is_prefilled_in_a_fixed_shape_step(loaded):
    """On a GPU that step is a captured graph per 64-token length bucket; the answers do not change."""
    requests = [request(loaded, seed, images=images) for seed, images in ((50, 0), (51, 3), (52, 6))]
    params = GenerationParams(max_new_tokens=20, ignore_eos=True)
    with Engine(loaded, EngineSettings(max_batch=2, static_decode=True)) as engine:
        got = [engine.submit(ids, pixels, params) for ids, pixels in requests[:1]]
        got[0].text()
        for ids, pixels in requests[1:]:  # one at a time, so each finds the engine idle
            got.append(engine.submit(ids, pixels, params))
            got[-1].text()
        buckets = sorted(engine._graphs.prefills)
    assert [h.stats.tokens for h in got] == [alone(loaded, ids, pixels, params) for ids, pixels in requests]
    assert buckets == sorted({-(-len(ids) // 64) * 64 for ids, _ in requests}) and len(buckets) > 1


def test_warm_up_builds_the_first_shapes_before_anyone_asks_and_counts_no_one(loaded):
    with Engine(loaded, EngineSettings(max_batch=2, static_decode=True)) as engine:
        assert engine.warm_up() > 0
        assert sorted({batch for batch, _ in engine._graphs.graphs}) == [1, 2]  # alone and two together
        assert engine._graphs.prefills  # the lone prompt's prefill step too
        status = engine.status()
        assert status["requests_completed"] == 0 and status["requests_submitted"] == 0
        params = GenerationParams(max_new_tokens=6, ignore_eos=True)
        ids, pixels = request(loaded, 60)
        handle = engine.submit(ids, pixels, params)
        handle.text()
    assert handle.stats.tokens == alone(loaded, ids, pixels, params)


def test_compiling_can_be_turned_off_from_the_command_line_and_the_environment():
    import app
    from owl.settings import load_settings

    assert load_settings(app.parse_args([]), environ={}).compile is True
    assert load_settings(app.parse_args(["--no-compile"]), environ={}).compile is False
    assert load_settings(app.parse_args([]), environ={"OWL_COMPILE": "0"}).compile is False


def test_batched_greedy_answers_equal_the_same_requests_alone(loaded):
    requests = [request(loaded, seed, images=seed % 3) for seed in range(7)]
    params = GenerationParams(max_new_tokens=30, ignore_eos=True)
    expected = [alone(loaded, ids, pixels, params) for ids, pixels in requests]
    with Engine(loaded, EngineSettings(max_batch=4, queue_size=8)) as engine:
        handles = [engine.submit(ids, pixels, params) for ids, pixels in requests]
        for handle in handles:
            handle.text()
    assert [h.stats.tokens for h in handles] == expected


@pytest.mark.parametrize("static", [False, True], ids=["eager", "fixed-shape-pipelined"])
def test_seeded_sampling_and_penalties_give_the_same_answers_batched_as_alone(loaded, static, monkeypatch):
    """The page's default (sampling, top-k 3, top-p 0.9, no repeated 2-grams), a repetition
    penalty and a greedy no-repeat row share steps; each answer is the one it gets alone.

    With fixed-shape steps the tokens are chosen on the device and the next step starts before
    the host reads them, the histories the penalties need being extended on the device too; a
    request finishing early and one joining later rebuild them.
    """
    from owl.cuda_graphs import DecodeGraphs

    picked = []
    follow = DecodeGraphs.follow
    monkeypatch.setattr(
        DecodeGraphs,
        "follow",
        lambda self, prev, longest, pick=None: (
            picked.append(pick is not None) or follow(self, prev, longest, pick)
        ),
    )
    page = GenerationParams(
        max_new_tokens=40, do_sample=True, top_k=3, top_p=0.9, no_repeat_ngram_size=2, ignore_eos=True
    )
    kinds = [
        replace(page, seed=1),
        replace(page, seed=2),
        GenerationParams(max_new_tokens=40, do_sample=True, repetition_penalty=1.5, seed=3, ignore_eos=True),
        GenerationParams(max_new_tokens=40, no_repeat_ngram_size=1, ignore_eos=True),  # no token twice
        replace(page, seed=4, max_new_tokens=15),
    ]
    requests = [request(loaded, seed, images=seed % 2) for seed in range(60, 65)]
    expected = [
        alone(loaded, ids, pixels, params) for (ids, pixels), params in zip(requests, kinds, strict=True)
    ]
    settings = EngineSettings(max_batch=4, queue_size=8, static_decode=static)
    with Engine(loaded, settings) as engine:
        handles = [
            engine.submit(ids, pixels, params) for (ids, pixels), params in zip(requests, kinds, strict=True)
        ]
        for handle in handles:
            handle.text()
    assert [h.stats.tokens for h in handles] == expected
    assert any(picked) == static  # the pipelined path chose sampled tokens on the device
    for tokens in (expected[0], expected[1], expected[4]):  # the 2-gram ban held
        pairs = list(itertools.pairwise(tokens))
        assert len(pairs) == len(set(pairs))
    assert len(set(expected[3])) == len(expected[3])
    plain = alone(loaded, *requests[3], GenerationParams(max_new_tokens=40, ignore_eos=True))
    assert len(set(plain)) < len(plain)  # without the ban this model repeats itself


def test_requests_that_arrive_together_are_prefilled_in_one_pass(loaded):
    """While the worker is busy, three requests of different lengths queue; they are prefilled as one
    padded batch (one forward pass), and each answer is still the one it gets alone."""
    busy = threading.Event()
    release = threading.Event()

    def fault(handle, phase):
        if handle.id == "req-1" and phase == "prefill":
            busy.set()
            release.wait(10)

    prefills = []

    def record(module, args):
        if args[0].shape[1] > 1:  # token ids (n, L): a prefill; decode steps embed (B, 1)
            prefills.append(tuple(args[0].shape))

    requests = [request(loaded, seed, images=seed % 3) for seed in range(20, 24)]
    params = GenerationParams(max_new_tokens=16, ignore_eos=True)
    expected = [alone(loaded, ids, pixels, params) for ids, pixels in requests]
    hook = loaded.model.language_model.get_input_embeddings().register_forward_pre_hook(record)
    try:
        with Engine(loaded, EngineSettings(max_batch=4), fault_hook=fault) as engine:
            handles = [engine.submit(*requests[0], params)]
            assert busy.wait(10)
            handles += [engine.submit(ids, pixels, params) for ids, pixels in requests[1:]]
            release.set()
            for handle in handles:
                handle.text()
    finally:
        hook.remove()
    longest = max(len(ids) for ids, _ in requests[1:])
    assert prefills == [(1, len(requests[0][0])), (3, longest)]
    assert [h.stats.tokens for h in handles] == expected


def test_fixed_shape_decode_steps_match(loaded):
    """The path that becomes CUDA graphs on a GPU (padded batch, bucketed span) gives the same tokens."""
    requests = [request(loaded, seed) for seed in range(3)]
    params = GenerationParams(max_new_tokens=20, ignore_eos=True)
    expected = [alone(loaded, ids, pixels, params) for ids, pixels in requests]
    with Engine(loaded, EngineSettings(max_batch=4, static_decode=True)) as engine:
        handles = [engine.submit(ids, pixels, params) for ids, pixels in requests]
        texts = [h.text() for h in handles]
        assert engine._graphs is not None and engine._graphs.graphs
    assert [h.stats.tokens for h in handles] == expected and all(texts)


def test_an_exception_in_one_request_fails_only_that_request(loaded):
    def fault(handle, phase):
        if handle.id == "req-1" and phase == "token" and handle.stats.completion_tokens == 3:
            raise RuntimeError("injected fault")

    ids, pixels = request(loaded, 5)
    with Engine(loaded, EngineSettings(max_batch=4), fault_hook=fault) as engine:
        broken = engine.submit(*request(loaded, 4), SHORT)
        healthy = engine.submit(ids, pixels, SHORT)
        with pytest.raises(RequestFailed, match="RuntimeError: injected fault"):
            broken.text()
        healthy.text()
    assert healthy.stats.tokens == alone(loaded, ids, pixels, SHORT)


def test_out_of_memory_fails_that_request_with_its_own_message(loaded):
    def fault(handle, phase):
        if handle.id == "req-2" and phase == "prefill":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    ids, pixels = request(loaded, 7)
    with Engine(loaded, EngineSettings(max_batch=4), fault_hook=fault) as engine:
        healthy = engine.submit(ids, pixels, SHORT)
        starved = engine.submit(*request(loaded, 8, images=2), SHORT)
        with pytest.raises(OutOfMemory, match="ran out of memory for this request"):
            starved.text()
        healthy.text()
        after = engine.submit(*request(loaded, 9), SHORT)  # the worker goes on
        assert after.text()
        assert engine.status()["requests_failed"] == {"out_of_memory": 1}
    assert healthy.stats.tokens == alone(loaded, ids, pixels, SHORT)


class _Crash(BaseException):
    """Something the per-request guards do not catch: it takes the worker thread down."""


def test_a_dead_worker_fails_pending_requests_and_is_replaced(loaded):
    crashed = threading.Event()
    both_queued = threading.Event()

    def fault(handle, phase):
        if handle.id == "req-1" and phase == "token" and not crashed.is_set():
            crashed.set()
            both_queued.wait(5)  # crash only once the second request is waiting
            raise _Crash("worker killed")

    with Engine(loaded, EngineSettings(max_batch=1, queue_size=4), fault_hook=fault) as engine:
        doomed = engine.submit(*request(loaded, 1), LONG)
        waiting = engine.submit(*request(loaded, 2), LONG)
        both_queued.set()
        for handle in (doomed, waiting):
            with pytest.raises(WorkerUnavailable, match="the model worker failed"):
                handle.text()
        for _ in range(100):
            if engine.alive:
                break
            threading.Event().wait(0.05)
        assert engine.status()["worker_restarts"] == 1
        assert engine.submit(*request(loaded, 3), SHORT).text()


def test_requests_over_their_time_limit_are_stopped(loaded):
    def slow_tokens(handle, phase):  # 250 tokens take over 1 s, however fast the model is
        if phase == "token":
            time.sleep(0.005)

    settings = EngineSettings(max_batch=2, request_timeout_s=0.2)
    with Engine(loaded, settings, fault_hook=slow_tokens) as engine:
        slow = engine.submit(*request(loaded, 2), GenerationParams(max_new_tokens=250, ignore_eos=True))
        with pytest.raises(RequestTimeout, match="longer than 0.2 s"):
            slow.text()
        assert slow.stats.completion_tokens < 250


def test_async_iteration_streams_deltas(loaded):
    async def consume(engine):
        handle = engine.submit(*request(loaded, 6), SHORT)
        return [delta async for delta in handle], handle

    with Engine(loaded) as engine:
        deltas, handle = asyncio.run(consume(engine))
    assert len(deltas) > 1 and handle.stats.finish_reason == "length"


def test_status_counts_work(loaded):
    with Engine(loaded, EngineSettings(max_batch=2)) as engine:
        for seed in range(3):
            engine.submit(*request(loaded, seed), SHORT).text()
        status = engine.status()
    assert status["requests_completed"] == 3
    assert status["tokens_generated"] == 36
    assert status["ttft_p50_s"] is not None and status["queue_depth"] == 0


def test_prompt_too_long_is_refused_before_queueing(loaded):
    with Engine(loaded) as engine, pytest.raises(ValueError, match="the prompt is 400 tokens"):
        engine.submit([1] * 400, None, SHORT)
