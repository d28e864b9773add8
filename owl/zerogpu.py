"""ZeroGPU mode (HuggingFace Spaces): answers run inside ``@spaces.GPU`` calls, one per request.

On ZeroGPU a GPU is attached to the process only while a function decorated with
``@spaces.GPU`` runs, so a resident worker thread cannot hold it. ``DirectEngine`` has the
``Engine`` interface the app uses, but each request generates in its own thread inside one such
call, streaming through the same ``RequestHandle``; Stop and closed connections cancel it
between two tokens, as with the worker. Requests are not batched together (the platform queues
GPU calls itself); ``queue_size`` still bounds how many may be in flight.

The mode is chosen when ``SPACES_ZERO_GPU`` is set (as ZeroGPU Spaces do) and is off elsewhere;
without the ``spaces`` package the decorator is the identity, which is how the tests run it.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import threading
import time
from typing import Any

from owl.engine import EngineMetrics, EngineSettings, RequestHandle
from owl.errors import OwlError, QueueFullError, RequestFailed
from owl.generation import GenerationStats, check_context, stream_generate
from owl.params import GenerationParams

log = logging.getLogger(__name__)


def on_zero_gpu(environ: dict[str, str] | None = None) -> bool:
    value = (os.environ if environ is None else environ).get("SPACES_ZERO_GPU", "")
    return value.strip().lower() in ("1", "true", "yes")


def gpu_decorator(duration: int):
    """``spaces.GPU(duration=...)`` where the package exists, else the identity."""
    try:
        import spaces
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


class DirectEngine:
    """One ``@spaces.GPU`` call per request, streaming into the usual request handle."""

    def __init__(self, loaded, settings: EngineSettings | None = None, *, gpu_seconds: int = 120):
        self.loaded = loaded
        self.settings = settings or EngineSettings()
        self.max_seq_len = self.settings.max_seq_len or loaded.config.max_positions or 2048
        self.metrics = EngineMetrics()
        self._ids = itertools.count(1)
        self._in_flight = 0
        self._lock = threading.Lock()
        self._running = False
        self._generate = gpu_decorator(gpu_seconds)(self._generate_on_gpu)

    # The Engine interface the app uses.
    def start(self) -> DirectEngine:
        self._running = True
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._running = False

    def __enter__(self) -> DirectEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self._running

    def _wake(self) -> None:
        """Cancellation is seen by the generating thread itself."""

    def _queue_position(self, handle: RequestHandle) -> int | None:
        return None

    def status(self) -> dict[str, Any]:
        with self._lock:
            active = self._in_flight
        return {
            "alive": self.alive,
            "queue_depth": 0,
            "active": active,
            "max_batch": 1,
            "queue_size": self.settings.queue_size,
            "worker_restarts": 0,
            "mode": "zerogpu",
            "layers": "transformers",  # each answer is one generate() inside its GPU call
            **self.metrics.snapshot(),
        }

    def submit(self, prompt_ids: list[int], pixels, params: GenerationParams) -> RequestHandle:
        check_context(len(prompt_ids), self.max_seq_len, params.max_new_tokens)
        with self._lock:
            if self._in_flight >= self.settings.queue_size + 1:
                self.metrics.count_failure(QueueFullError.kind)
                raise QueueFullError(
                    f"the queue is full: {self._in_flight} requests are in flight; try again shortly"
                )
            self._in_flight += 1
        handle = RequestHandle(f"req-{next(self._ids)}", self)
        handle.stats.prompt_tokens = len(prompt_ids)
        self.metrics.submitted += 1
        # Copy the caller's context: ZeroGPU finds the Gradio request it bills the GPU time to there.
        context = contextvars.copy_context()
        threading.Thread(
            target=context.run,
            args=(self._pump, handle, prompt_ids, pixels, params),
            name=f"owl-{handle.id}",
            daemon=True,
        ).start()
        return handle

    def submit_conversation(self, conversation, params: GenerationParams) -> RequestHandle:
        from owl.checkpoint import prepare

        ids, pixels = prepare(self.loaded, conversation)
        return self.submit(ids, pixels, params)

    def _pump(self, handle: RequestHandle, prompt_ids, pixels, params: GenerationParams) -> None:
        handle.stats.started = time.monotonic()
        stats = GenerationStats()
        reason, error = "stop", None
        try:
            for delta in self._generate(prompt_ids, pixels, params, handle._cancel, stats):
                if handle.stats.first_token is None:
                    handle.stats.first_token = time.monotonic()
                    self.metrics.observe_ttft(handle.stats.ttft_s)
                handle._put(delta)
            handle.stats.tokens = stats.tokens
            handle.stats.completion_tokens = stats.completion_tokens
            self.metrics.tokens += stats.completion_tokens
            reason = stats.finish_reason or "stop"
            if reason == "cancelled":
                self.metrics.cancelled += 1
            else:
                self.metrics.completed += 1
        except Exception as err:
            error = (
                err
                if isinstance(err, OwlError)
                else RequestFailed(f"generation failed: {type(err).__name__}: {err}")
            )
            if not isinstance(err, OwlError):
                log.exception("request %s failed", handle.id)
            self.metrics.count_failure(error.kind)
            reason = "error"
        # Free the place before the caller hears the answer is done, so it can ask again at once.
        with self._lock:
            self._in_flight -= 1
        handle._finish(reason, error)

    def _generate_on_gpu(self, prompt_ids, pixels, params, cancel, stats):
        """The function that holds the GPU: the whole answer, streamed."""
        model = self.loaded.model
        yield from stream_generate(
            model, self.loaded.tokenizer, prompt_ids, pixels, params, cancel=cancel, stats=stats
        )
