"""The serving engine: one worker thread owns the model and serves everyone, batched.

Requests enter a bounded queue and come back as a stream of text deltas (``RequestHandle``,
iterable synchronously and asynchronously). Between decode steps the worker admits waiting
requests: their images are encoded together and their prompts prefilled together, straight
into free slots of a preallocated cache. Every step then decodes one token for all active
requests at once, each at its own position (``SlotCache``), with its own sampling parameters.
A cancelled request (Stop, closed tab, timeout) leaves at the next step and its slot goes to
the next in line.

LLaMA layers run through ``owl.fused`` (compiled on a GPU); on a GPU the decode steps, the
vision encoder and a lone prompt's prefill are CUDA graphs (``owl.cuda_graphs``), and an
all-greedy batch starts each step before the previous one's tokens are read and streamed.

Failures are specific (``owl.errors``) and local: a request whose prefill, sampling or
decoding fails gets its own error while the others go on; out-of-memory frees the cache and
fails the request that needed the memory. If the worker thread itself dies, every pending
request fails at once and a new worker starts.

transformers' own continuous-batching manager was considered and not used: it takes prompts
as token ids only, so it cannot receive the image vectors spliced into the embeddings.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from owl.config import IMAGE_TOKEN_ID
from owl.errors import (
    OutOfMemory,
    OwlError,
    QueueFullError,
    RequestFailed,
    RequestTimeout,
    WorkerUnavailable,
)
from owl.fused import FusedLlama, prompt_mask
from owl.generation import TextStream, check_context
from owl.sampling import (
    GenerationParams,
    Histories,
    TokenHistory,
    choose,
    choose_tokens,
    make_generator,
    needs_choosing,
)

log = logging.getLogger(__name__)

_END = object()


@dataclass
class EngineSettings:
    max_batch: int = 8  # requests decoded together
    queue_size: int = 32  # requests waiting beyond those
    max_seq_len: int | None = None  # per request; defaults to the model's context
    request_timeout_s: float | None = 600.0
    prefill_tokens: int = 8192  # padded prompt tokens prefilled in one forward pass
    # Decode through fixed-shape steps (owl.cuda_graphs): captured as CUDA graphs on a GPU.
    # None: on for CUDA, off on CPU; True on CPU runs the same fixed-shape steps eagerly.
    static_decode: bool | None = None
    # LLaMA layers through owl.fused (merged projections, one function per layer); None: wherever
    # the model allows it. compile: that function through torch.compile; None: on CUDA only.
    fused: bool | None = None
    compile: bool | None = None


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # stop, length, cancelled, error
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # when each token was produced

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted


class RequestHandle:
    """The caller's side of a request: iterate for text deltas, ``cancel()`` to stop it."""

    def __init__(self, request_id: str, engine: Engine):
        self.id = request_id
        self.stats = RequestStats()
        self.error: BaseException | None = None
        self._engine = engine
        self._cancel = threading.Event()
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_items: asyncio.Queue | None = None
        self.done = threading.Event()

    # -- worker side --
    def _put(self, item: Any) -> None:
        with self._lock:
            if self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the consumer's loop has closed
                    self._loop.call_soon_threadsafe(self._async_items.put_nowait, item)
            else:
                self._items.put(item)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self.done.is_set():
            return
        self.stats.finish_reason = reason
        self.stats.finished = time.monotonic()
        self.error = error
        self.done.set()
        self._put(_END)

    # -- caller side --
    def cancel(self) -> None:
        """Stop generating; the request leaves the batch at the next step."""
        self._cancel.set()
        self._engine._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def position(self) -> int | None:
        """Place in the waiting queue (1 = next), or None once running or finished."""
        return self._engine._queue_position(self)

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                item = self._items.get()
                if item is _END:
                    break
                yield item
        finally:
            if not self.done.is_set():
                self.cancel()  # the consumer went away (closed tab, generator closed)
        if self.error is not None:
            raise self.error

    def __aiter__(self):
        return self.updates(poll_s=None)

    async def updates(self, poll_s: float | None = 0.5):
        """Text deltas as they come; while the request waits, its queue position (an int) every ``poll_s``."""
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._async_items = asyncio.Queue()
            while not self._items.empty():  # whatever arrived before we started listening
                self._async_items.put_nowait(self._items.get())
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self._async_items.get(), timeout=poll_s)
                except TimeoutError:
                    position = self.position()
                    if position is not None:
                        yield position
                    continue
                if item is _END:
                    break
                yield item
        finally:
            if not self.done.is_set():
                self.cancel()  # the consumer went away
        if self.error is not None:
            raise self.error

    def text(self) -> str:
        """Wait for the whole answer."""
        return "".join(self)


@dataclass
class _Active:
    """A request in the batch: its slot, position and decoding state."""

    handle: RequestHandle
    params: GenerationParams
    budget: int
    position: int  # where the next token's key/value goes
    last_token: int
    history: TokenHistory  # BOS and the answer so far, for the penalties
    text: TextStream
    generator: torch.Generator | None
    deadline: float | None
    serial_cache: Any = None  # non-LLaMA models only: the request's own transformers cache


@dataclass
class _Waiting:
    handle: RequestHandle
    prompt_ids: list[int]
    pixels: torch.Tensor | None
    params: GenerationParams


class SlotCache:
    """Keys and values for ``slots`` requests of up to ``max_len`` tokens, each at its own position.

    Implements the part of transformers' ``Cache`` interface that the LLaMA attention calls
    (``update``), writing each row's new keys/values at that row's positions and returning the
    rows' whole prefix up to ``read_len`` for attention. Active requests always occupy slots
    0..B-1, so every read is a view, never a copy.
    """

    is_compileable = False

    def __init__(self, config, slots: int, max_len: int, device: torch.device, dtype: torch.dtype):
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots, heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)
        ]
        self.slots, self.max_len = slots, max_len
        self.head_index = torch.arange(heads, device=device).view(1, heads, 1)
        self.rows = torch.zeros(1, dtype=torch.long, device=device)  # (B,) slots being written
        self.positions = torch.zeros(1, 1, dtype=torch.long, device=device)  # (B, q)
        self.read_start = 0
        self.read_len = 1
        self.layers = self.keys  # transformers checks len(cache.layers) in places

    def set_step(self, rows: torch.Tensor, positions: torch.Tensor, read_start: int, read_len: int) -> None:
        self.rows, self.positions, self.read_start, self.read_len = rows, positions, read_start, read_len

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        index = (self.rows.view(-1, 1, 1), self.head_index, self.positions.unsqueeze(1))  # (B, h, q)
        self.keys[layer_idx].index_put_(index, key_states)
        self.values[layer_idx].index_put_(index, value_states)
        rows = slice(self.read_start, self.read_start + key_states.shape[0])
        return self.keys[layer_idx][rows, :, : self.read_len], self.values[layer_idx][
            rows, :, : self.read_len
        ]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.read_len

    def move(self, source: int, target: int, length: int) -> None:
        """Move one request's cache to another slot (compaction after a request leaves)."""
        for tensors in (self.keys, self.values):
            for t in tensors:
                t[target, :, :length] = t[source, :, :length]


class Engine:
    """Owns the model in one worker thread; ``submit`` from any thread."""

    def __init__(
        self,
        loaded,
        settings: EngineSettings | None = None,
        *,
        fault_hook: Callable[[RequestHandle, str], None] | None = None,
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.settings = settings or EngineSettings()
        self.fault_hook = fault_hook  # tests and chaos drills: called at "prefill" and "token"
        self.max_seq_len = self.settings.max_seq_len or self.model.config.max_positions or 2048
        self.batched = self.model.config.text.get("model_type") == "llama"
        self.max_batch = self.settings.max_batch if self.batched else 1
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._cond = threading.Condition()
        self._active: list[_Active] = []
        self._ids = itertools.count(1)
        self._cache: SlotCache | None = None
        self._graphs = None
        self._vision_graphs = None
        self._fused = self._make_fused() if self.batched else None
        # A pipelined step not read yet: its rows, the launched step, how it picks its tokens.
        self._flight: tuple[list[_Active], Any, Any] | None = None
        self._running = False
        self._thread: threading.Thread | None = None
        self._restarts = 0
        self.metrics = EngineMetrics()

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Engine:
        with self._cond:
            if self._running:
                return self
            self._running = True
        self._spawn()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_everyone(WorkerUnavailable("the server is shutting down"))

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self) -> None:
        self._thread = threading.Thread(target=self._supervised, name="owl-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._running and self._thread is not None and self._thread.is_alive()

    # --- submitting ------------------------------------------------------------------------------
    def submit(
        self, prompt_ids: list[int], pixels: torch.Tensor | None, params: GenerationParams
    ) -> RequestHandle:
        """Queue a request; raises at once if it cannot be served (queue full, too long, no worker)."""
        if not self.alive:
            raise WorkerUnavailable("the model worker is not running; the server is restarting it")
        budget = check_context(len(prompt_ids), self.max_seq_len, params.max_new_tokens)
        handle = RequestHandle(f"req-{next(self._ids)}", self)
        handle.stats.prompt_tokens = len(prompt_ids)
        with self._cond:
            if len(self._waiting) >= self.settings.queue_size:
                self.metrics.count_failure(QueueFullError.kind)
                raise QueueFullError(
                    f"the queue is full: {len(self._waiting)} requests are already waiting for "
                    f"{len(self._active)} running ones; try again in a moment"
                )
            params = params if budget == params.max_new_tokens else _with_budget(params, budget)
            self._waiting.append(_Waiting(handle, list(prompt_ids), pixels, params))
            self.metrics.submitted += 1
            self._cond.notify_all()
        return handle

    def warm_up(self) -> float:
        """Serve a few short requests (one alone, then two together) so that compilation and graph
        capture for the first shapes happen now rather than in someone's first answer; seconds taken."""
        started = time.monotonic()
        config = self.model.config
        prompt = [self.tokenizer.bos_token_id, *[IMAGE_TOKEN_ID] * config.num_image_tokens, *range(10, 40)]
        size = config.vision.image_size
        pixels = torch.zeros(1, 3, size, size)
        params = GenerationParams(max_new_tokens=4, do_sample=False, ignore_eos=True)
        for together in (1, min(2, self.max_batch)):
            handles = [self.submit(prompt, pixels, params) for _ in range(together)]
            for handle in handles:
                handle.text()
        self.metrics = EngineMetrics()  # nobody was served yet
        return time.monotonic() - started

    def submit_conversation(self, conversation, params: GenerationParams) -> RequestHandle:
        """Tokenise and load the images in the caller's thread, then queue."""
        from owl.checkpoint import prepare

        ids, pixels = prepare(self.loaded, conversation)
        return self.submit(ids, pixels, params)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _queue_position(self, handle: RequestHandle) -> int | None:
        with self._cond:
            for i, waiting in enumerate(self._waiting):
                if waiting.handle is handle:
                    return i + 1
        return None

    def status(self) -> dict[str, Any]:
        with self._cond:
            waiting, active = len(self._waiting), len(self._active)
        return {
            "alive": self.alive,
            "queue_depth": waiting,
            "active": active,
            "max_batch": self.max_batch,
            "queue_size": self.settings.queue_size,
            "worker_restarts": self._restarts,
            "layers": self._layers(),
            **self.metrics.snapshot(),
        }

    # --- the worker ------------------------------------------------------------------------------
    def _supervised(self) -> None:
        try:
            self._run()
        except BaseException as err:
            log.exception("the model worker died")
            error = WorkerUnavailable(f"the model worker failed ({type(err).__name__}: {err}); please retry")
            pending = self._drain()
            self._cache = self._graphs = self._vision_graphs = self._flight = None
            with self._cond:
                restart = self._running
            if restart:  # the replacement runs before anyone hears of the failure
                self._restarts += 1
                self._spawn()
            self._fail_handles(pending, error)

    def _drain(self) -> list[RequestHandle]:
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
            active, self._active = self._active, []
        return [w.handle for w in waiting] + [a.handle for a in active]

    def _fail_handles(self, handles: list[RequestHandle], error: OwlError) -> None:
        for handle in handles:
            self.metrics.count_failure(error.kind)
            handle._finish("error", error)

    def _fail_everyone(self, error: OwlError) -> None:
        self._fail_handles(self._drain(), error)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._waiting and not self._active:
                    self._cond.wait(timeout=1.0)
                if not self._running:
                    return
                free = self.max_batch - len(self._active)
                admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            if admitted:
                self._land_flight()  # new rows join a batch whose tokens are all read
            self._drop_finished()
            if admitted:
                self._admit(admitted)
            if self._active:
                self._decode_step()

    def _ensure_cache(self) -> SlotCache:
        if self._cache is None:
            lm_config = self.model.language_model.config
            self._cache = SlotCache(
                lm_config, self.max_batch, self.max_seq_len, self.model.device, self.model.dtype
            )
            static = self.settings.static_decode
            if static is None:
                static = self.model.device.type == "cuda"
            if static and self.batched:
                from owl.cuda_graphs import DecodeGraphs, VisionGraphs

                self._graphs = DecodeGraphs(self.model, self._cache, fused=self._fused)
                if self.model.device.type == "cuda":
                    self._vision_graphs = VisionGraphs(self.model)
        return self._cache

    def _layers(self) -> str:
        """How the language model's layers run: fused and compiled, fused, or transformers' own."""
        if self._fused is None:
            return "transformers"
        return "fused, compiled" if self._fused.compiled else "fused"

    def _make_fused(self) -> FusedLlama | None:
        wanted = self.settings.fused
        if wanted is False:
            return None
        why = FusedLlama.supports(self.model.language_model)
        if why is not None:
            if wanted:
                log.warning("fused LLaMA layers are off: %s", why)
            return None
        compile = self.settings.compile
        if compile is None:
            compile = self.model.device.type == "cuda"
        return FusedLlama(self.model.language_model, compile=compile)

    def _admit(self, admitted: list[_Waiting]) -> None:
        """Encode new requests' images together, prefill them together, and seat them in the batch."""
        self._ensure_cache()
        live = []
        for waiting in admitted:
            if waiting.handle.cancelled:
                waiting.handle._finish("cancelled")
            else:
                live.append(waiting)
        encoded = [(w, e) for w, e in zip(live, self._encode_images(live), strict=True) if e is not None]
        for group in self._prefill_groups(encoded):
            for waiting, _ in group:
                waiting.handle.stats.started = time.monotonic()
            try:
                self._prefill_and_seat(group)
            except Exception as err:
                if len(group) == 1:
                    self._fail(group[0][0].handle, err)
                    continue
                log.warning(
                    "prefill of %d requests failed; prefilling them one by one", len(group), exc_info=True
                )
                # Find the request that fails by prefilling the group one by one.
                for waiting, embeds in group:
                    try:
                        self._prefill_and_seat([(waiting, embeds)])
                    except Exception as err:
                        self._fail(waiting.handle, err)

    def _prefill_groups(self, encoded: list) -> list[list]:
        """Requests prefilled in one forward pass: up to ``prefill_tokens`` padded tokens each."""
        if not self.batched:
            return [[item] for item in encoded]
        groups, group, longest = [], [], 0
        for item in encoded:
            length = len(item[0].prompt_ids)
            if group and max(longest, length) * (len(group) + 1) > self.settings.prefill_tokens:
                groups.append(group)
                group, longest = [], 0
            group.append(item)
            longest = max(longest, length)
        return [*groups, group] if group else groups

    @torch.inference_mode()
    def _prefill_and_seat(self, group: list) -> None:
        """One forward pass over the group's prompts; their keys/values land in their slots."""
        for waiting, _ in group:
            self._hook(waiting.handle, "prefill")
        if self.batched:
            first = len(self._active)
            logits = self._prefill_slots(group, first)
            requests = [self._seat(waiting) for waiting, _ in group]
        else:
            waiting, embeds = group[0]
            logits, cache = self._prefill_dynamic(waiting.prompt_ids, embeds)
            requests = [self._seat(waiting, serial_cache=cache)]
        for request, token in zip(requests, self._choose(requests, logits), strict=True):
            if token is not None:
                try:
                    self._accept(request, token)
                except Exception as err:
                    self._fail(request.handle, err)

    def _prefill_slots(self, group: list, first: int) -> torch.Tensor:
        """Right-padded prompts (n, L) through the LLM, written into slots first..first+n-1; (n, V) logits."""
        device = self.model.device
        lengths = [len(waiting.prompt_ids) for waiting, _ in group]
        width = max(lengths)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        for row, (waiting, _) in enumerate(group):
            ids[row, : lengths[row]] = torch.tensor(waiting.prompt_ids)
        images = [embeds for _, embeds in group if embeds.numel()]
        embeds = self.model.embed(ids.to(device), torch.cat(images) if images else None)
        if self._graphs is not None and first == 0 and len(group) == 1:
            logits = self._graphs.prefill(embeds)  # a lone prompt on an idle engine: a captured graph
            if logits is not None:
                return logits
        positions = torch.arange(width, device=device).expand(len(group), width)
        mask = prompt_mask(torch.tensor(lengths, device=device), width)  # (n, 1, L, L)
        rows = torch.arange(first, first + len(group), device=device)
        last = (torch.arange(len(group), device=device), torch.tensor(lengths, device=device) - 1)
        if self._fused is not None:
            hidden = self._fused.hidden(embeds, positions, mask, self._cache, rows, first)  # (n, L, H)
            return self._fused.logits(hidden[last])  # (n, V)
        self._cache.set_step(rows, positions, first, width)
        hidden = self.model.language_model.model(
            inputs_embeds=embeds,
            position_ids=positions,
            attention_mask=mask,
            cache=self._cache,
            use_cache=True,
        ).last_hidden_state  # (n, L, H)
        return self.model.language_model.lm_head(hidden[last])  # (n, V)

    def _prefill_dynamic(self, prompt_ids: list[int], image_embeds: torch.Tensor):
        """Prefill for language models decoded one at a time (BLOOM), with transformers' own cache."""
        from transformers import DynamicCache

        ids = torch.tensor([prompt_ids], device=self.model.device)
        embeds = self.model.embed(ids, image_embeds if image_embeds.numel() else None)
        cache = DynamicCache(config=self.model.language_model.config)
        out = self.model.language_model(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], cache

    def _encode_images(self, requests: list[_Waiting]) -> list[torch.Tensor | None]:
        """Image vectors per request (an empty tensor for text-only), encoded in one batch."""
        counts = [0 if r.pixels is None else r.pixels.shape[0] for r in requests]
        out: list[Any] = [torch.empty(0)] * len(requests)
        if not any(counts):
            return out
        pixels = torch.cat([r.pixels for r in requests if r.pixels is not None and r.pixels.shape[0]])
        try:
            embeds = self._vision(pixels)
        except Exception:
            self._free_memory()
            # Encode one request at a time to find which one fails (out of memory, most likely).
            for i, request in enumerate(requests):
                if counts[i]:
                    try:
                        out[i] = self._vision(request.pixels)
                    except Exception as err:
                        self._fail(request.handle, err)
                        out[i] = None
            return out
        start = 0
        for i, count in enumerate(counts):
            if count:
                out[i] = embeds[start : start + count]
                start += count
        return out

    @torch.inference_mode()
    def _vision(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._vision_graphs is not None:
            return self._vision_graphs.run(pixels)
        return self.model.encode_images(pixels)

    def _seat(self, waiting: _Waiting, serial_cache=None) -> _Active:
        params = waiting.params
        request = _Active(
            handle=waiting.handle,
            params=params,
            budget=params.max_new_tokens,
            position=len(waiting.prompt_ids),
            last_token=-1,
            history=TokenHistory([self.tokenizer.bos_token_id]),
            text=TextStream(self.tokenizer, params.stop),
            generator=make_generator(params),
            deadline=None
            if self.settings.request_timeout_s is None
            else waiting.handle.stats.submitted + self.settings.request_timeout_s,
            serial_cache=serial_cache,
        )
        with self._cond:
            self._active.append(request)
        return request

    def _choose(self, requests: list[_Active], logits: torch.Tensor) -> list[int | None]:
        """One token per request from (B, V) logits; None where choosing failed (that request fails)."""
        try:
            return choose(
                logits,
                [r.params for r in requests],
                [r.history for r in requests],
                [r.generator for r in requests],
            )
        except Exception:
            tokens: list[int | None] = []
            for row, request in enumerate(requests):  # find which request it was
                try:
                    tokens += choose(
                        logits[row : row + 1], [request.params], [request.history], [request.generator]
                    )
                except Exception as err:
                    self._fail(request.handle, err)
                    tokens.append(None)
            return tokens

    def _accept(self, request: _Active, token: int) -> None:
        """Stream and account one token for one request; finish it if it is done."""
        handle = request.handle
        self._hook(handle, "token")
        now = time.monotonic()
        stats = handle.stats
        if stats.first_token is None:
            stats.first_token = now
            self.metrics.observe_ttft(stats.ttft_s)
        stats.token_times.append(now)
        if token == self.tokenizer.eos_token_id and not request.params.ignore_eos:
            return self._complete(request, "stop")
        request.history.append(token)
        stats.tokens.append(token)
        stats.completion_tokens += 1
        self.metrics.tokens += 1
        request.last_token = token
        delta = request.text.push(token)
        if delta:
            handle._put(delta)
        if request.text.stopped:
            return self._complete(request, "stop")
        if stats.completion_tokens >= request.budget:
            return self._complete(request, "length")
        return None

    def _complete(self, request: _Active, reason: str) -> None:
        rest = request.text.finish()
        if rest:
            request.handle._put(rest)
        self.metrics.completed += 1
        request.handle._finish(reason)

    def _fail(self, handle: RequestHandle, err: BaseException) -> None:
        if isinstance(err, torch.OutOfMemoryError):
            self._free_memory()
            error: OwlError = OutOfMemory(
                "the GPU ran out of memory for this request; try fewer images, a shorter conversation "
                "or fewer new tokens"
            )
        elif isinstance(err, OwlError):
            error = err
        else:
            log.exception("request %s failed", handle.id, exc_info=err)
            error = RequestFailed(f"generation failed: {type(err).__name__}: {err}")
        self.metrics.count_failure(error.kind)
        handle._finish("error", error)

    def _free_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _hook(self, handle: RequestHandle, phase: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(handle, phase)

    def _drop_finished(self) -> None:
        """Remove finished, cancelled and timed-out requests; compact the slots they held."""
        now = time.monotonic()
        with self._cond:
            active = list(self._active)
        keep = []
        for request in active:
            handle = request.handle
            if not handle.done.is_set():
                if handle.cancelled:
                    handle._finish("cancelled")
                    self.metrics.cancelled += 1
                elif request.deadline is not None and now > request.deadline:
                    self._fail(
                        handle,
                        RequestTimeout(
                            f"the answer took longer than {self.settings.request_timeout_s:g} s and was stopped"
                        ),
                    )
            if not handle.done.is_set():
                keep.append(request)
        if len(keep) == len(active):
            return
        if self._flight is not None:  # its rows are laid out as before the compaction: land it first
            self._land_flight()
            return self._drop_finished()
        if self.batched and self._cache is not None:
            old_slots = {id(r): i for i, r in enumerate(active)}
            for new_slot, request in enumerate(keep):
                old = old_slots[id(request)]
                if old != new_slot:
                    self._cache.move(old, new_slot, request.position)
        with self._cond:
            self._active = keep

    @torch.inference_mode()
    def _decode_step(self) -> None:
        self._drop_finished()
        active = list(self._active)
        if not active:
            return
        if self._can_pipeline(active):
            return self._pipelined_step(active)
        if self._flight is not None:
            return self._land_flight()
        try:
            logits = self._batched_logits(active) if self.batched else self._serial_logits(active[0])
        except Exception as err:
            return self._step_failed(active, err)
        tokens = self._choose(active, logits)
        for request, token in zip(active, tokens, strict=True):
            request.position += 1
            if token is None:
                continue
            try:
                self._accept(request, token)
            except Exception as err:
                self._fail(request.handle, err)
        self._drop_finished()

    def _can_pipeline(self, active: list[_Active]) -> bool:
        """Fixed-shape steps: the next step can start before this one is read."""
        return (
            self._graphs is not None
            # The step after next must still fit: a pipelined step may run one past a request's end.
            and max(r.position for r in active) + 2 < self._cache.max_len
        )

    def _pipelined_step(self, active: list[_Active]) -> None:
        """Start the next step, then read and stream the one before it while the device works.

        Rows keep their order while a step is in flight: anything that would change the batch
        (an admission, a finished or cancelled request) lands the flight first (``_land_flight``).
        The step started after a request's last token computes one token too many for it; that
        token is dropped when it lands.
        """
        previous = self._flight
        try:
            if previous is not None and [id(r) for r in previous[0]] == [id(r) for r in active]:
                pick = previous[2]
                launched = self._graphs.follow(previous[1], max(r.position for r in active) + 1, pick)
            else:
                if previous is not None:
                    return self._land_flight()
                pick = self._picker(active)
                launched = self._graphs.launch(
                    [r.last_token for r in active], [r.position for r in active], pick
                )
        except Exception as err:
            if previous is not None:
                self._land_flight()
            return self._step_failed(active, err)
        self._flight = (active, launched, pick)
        if previous is not None:
            self._land(previous[0], previous[1])
        self._drop_finished()

    def _picker(self, active: list[_Active]):
        """How a pipelined batch chooses its tokens on the device: None for argmax (inside the step);
        else sampling and penalties over histories kept on the device, which each choice extends,
        since the host reads the tokens a step later. Built when the batch forms, from the rows'
        histories, which are then complete (every change of the batch lands the flight first)."""
        if not any(needs_choosing(r.params) for r in active):
            return None
        params = [r.params for r in active]
        generators = [r.generator for r in active]
        room = max(r.budget - r.handle.stats.completion_tokens for r in active) + 2
        histories = Histories([r.history for r in active], self.model.device, room=room)

        def pick(logits: torch.Tensor) -> torch.Tensor:
            tokens = choose_tokens(logits, params, histories, generators)
            histories.append(tokens)
            return tokens

        return pick

    @torch.inference_mode()  # also from the loop, when a request joins or leaves mid-answer
    def _land_flight(self) -> None:
        flight, self._flight = self._flight, None
        if flight is not None:
            self._land(flight[0], flight[1])

    def _land(self, requests: list[_Active], launched) -> None:
        try:
            tokens: list[int | None] = self._graphs.read(launched)
        except Exception as err:
            return self._step_failed(requests, err)
        for request, token in zip(requests, tokens, strict=True):
            if request.handle.done.is_set() or request.handle.cancelled:
                continue  # finished while this step was in flight: its token is one too many
            request.position += 1
            try:
                self._accept(request, token)
            except Exception as err:
                self._fail(request.handle, err)

    def _step_failed(self, active: list[_Active], err: Exception) -> None:
        if isinstance(err, torch.OutOfMemoryError):
            # Shed the longest request (it holds the most memory) and let the others go on.
            victim = max(active, key=lambda r: r.position)
            self._fail(victim.handle, err)
        else:
            for request in active:
                self._fail(request.handle, err)
        self._drop_finished()

    def _batched_logits(self, active: list[_Active]) -> torch.Tensor:
        tokens = [r.last_token for r in active]
        positions = [r.position for r in active]
        if self._graphs is not None:
            return self._graphs.run(tokens, positions)
        device = self.model.device
        position_ids = torch.tensor(positions, device=device).view(-1, 1)
        read_len = max(positions) + 1
        keys = torch.arange(read_len, device=device).view(1, 1, 1, -1)
        mask = keys <= position_ids.view(-1, 1, 1, 1)  # (B, 1, 1, read_len): each row sees its own prefix
        rows = torch.arange(len(active), device=device)
        embeds = self.model.embed_text(torch.tensor(tokens, device=device).view(-1, 1))
        if self._fused is not None:
            return self._fused.logits(
                self._fused.hidden(embeds, position_ids, mask, self._cache, rows, 0)[:, -1]
            )
        self._cache.set_step(rows, position_ids, 0, read_len)
        out = self.model.language_model(
            inputs_embeds=embeds,
            position_ids=position_ids,
            attention_mask=mask,
            cache=self._cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def _serial_logits(self, request: _Active) -> torch.Tensor:
        """Non-LLaMA language models (BLOOM): one request at a time with transformers' own cache."""
        embeds = self.model.embed_text(torch.tensor([[request.last_token]], device=self.model.device))
        out = self.model.language_model(inputs_embeds=embeds, cache=request.serial_cache, use_cache=True)
        return out.logits[:, -1]


def _with_budget(params: GenerationParams, budget: int) -> GenerationParams:
    import dataclasses

    return dataclasses.replace(params, max_new_tokens=budget)


class EngineMetrics:
    """Counters and recent timings; read by /health, /metrics and the page header."""

    def __init__(self, window: int = 512):
        self.submitted = 0
        self.completed = 0
        self.cancelled = 0
        self.tokens = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self._ttft: collections.deque[float] = collections.deque(maxlen=window)
        self._token_marks: collections.deque[tuple[float, int]] = collections.deque(maxlen=window)
        self._lock = threading.Lock()

    def count_failure(self, kind: str) -> None:
        with self._lock:
            self.failures[kind] += 1

    def observe_ttft(self, seconds: float | None) -> None:
        if seconds is not None:
            with self._lock:
                self._ttft.append(seconds)

    def tokens_per_second(self, horizon_s: float = 10.0) -> float:
        now = time.monotonic()
        with self._lock:
            self._token_marks.append((now, self.tokens))
            recent = [(t, n) for t, n in self._token_marks if now - t <= horizon_s]
        if len(recent) < 2 or recent[-1][0] == recent[0][0]:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            ttft = sorted(self._ttft)
            failures = dict(self.failures)
        return {
            "requests_submitted": self.submitted,
            "requests_completed": self.completed,
            "requests_cancelled": self.cancelled,
            "requests_failed": failures,
            "tokens_generated": self.tokens,
            "tokens_per_second": round(self.tokens_per_second(), 2),
            "ttft_p50_s": round(ttft[len(ttft) // 2], 4) if ttft else None,
        }
