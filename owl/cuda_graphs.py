"""Decode steps replayed as CUDA graphs, one per (batch bucket, length bucket).

A 7B decode step launches hundreds of small kernels; on an H100 launching them from Python
takes longer than running them. Each graph records one whole step (embedding lookup, the LLM
over the slot cache, the last logits) for a fixed batch size and attention span, with inputs in
static tensors. Batches are padded up to the next bucket (padded rows write only into free
slots), and the attention span rounds the longest position up to a multiple of ``LENGTH_STEP``
so a graph serves many steps. On CPU, or with ``capture=False``, the same code runs eagerly,
which is how the tests check it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from owl.fused import prompt_mask

log = logging.getLogger(__name__)

LENGTH_STEP = 256
# A lone prompt on an idle engine (the time to first token everyone sees) is prefilled by a
# captured graph too, its length padded up to a multiple of PREFILL_STEP, up to PREFILL_MAX.
PREFILL_STEP = 64
PREFILL_MAX = 2048

# Chooses each row's next token (B,) from its logits (B, V), on the device, without reading them.
Pick = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Graph:
    inputs: torch.Tensor  # (2, bb): tokens, positions
    logits: torch.Tensor  # (bb, V)
    chosen: torch.Tensor  # (bb,) each row's greedy token, chosen inside the step
    graph: torch.cuda.CUDAGraph | None

    @property
    def tokens(self) -> torch.Tensor:
        return self.inputs[0].view(-1, 1)

    @property
    def positions(self) -> torch.Tensor:
        return self.inputs[1].view(-1, 1)


@dataclass
class _Prefill:
    embeds: torch.Tensor  # (1, Lb, D) the prompt's embeddings, zero-padded
    length: torch.Tensor  # (1,) its real length
    logits: torch.Tensor  # (1, V) at its last real token
    graph: torch.cuda.CUDAGraph | None


@dataclass
class Launched:
    """A step on its way: its rows' tokens arrive in ``host`` once ``done`` has passed."""

    graph: _Graph
    batch: int
    host: torch.Tensor  # (bb,) chosen tokens, copied back without blocking
    done: torch.cuda.Event | None


class DecodeGraphs:
    def __init__(self, model, cache, *, fused=None, capture: bool | None = None):
        self.model = model
        self.cache = cache
        self.fused = fused  # owl.fused.FusedLlama, or None: transformers' own forward
        self.capture = model.device.type == "cuda" if capture is None else capture
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.prefills: dict[int, _Prefill] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.failed = False
        self._staging = torch.zeros(2, cache.slots, dtype=torch.long, pin_memory=self.capture)
        # Two read-back buffers, used in turn: one step's tokens are read while the next is computed.
        self._host = [torch.zeros(cache.slots, dtype=torch.long, pin_memory=self.capture) for _ in range(2)]
        self._turn = 0

    def buckets(self, batch: int, longest: int) -> tuple[int, int]:
        size = 1
        while size < batch:
            size *= 2
        span = -(-longest // LENGTH_STEP) * LENGTH_STEP
        return min(size, self.cache.slots), min(span, self.cache.max_len)

    def run(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (B, V) for rows 0..B-1 of the slot cache: each row's token at its position."""
        graph = self._replay(tokens, positions)
        return graph.logits[: len(tokens)]

    def launch(self, tokens: list[int], positions: list[int], pick: Pick | None = None) -> Launched:
        """Like ``run``, without waiting: the chosen tokens come back later.

        Each row's token is the argmax of its logits, chosen inside the step, unless ``pick``
        chooses them from the (B, V) logits on the device (sampling, penalties).
        """
        graph = self._replay(tokens, positions)
        self._pick(graph, len(tokens), pick)
        return self._read_back(graph, len(tokens))

    def follow(self, previous: Launched, longest: int, pick: Pick | None = None) -> Launched:
        """The next step of the same rows, fed on the device by ``previous``'s chosen tokens.

        Nothing waits for ``previous`` to finish. ``longest`` is the last position the new step writes.
        """
        key = self.buckets(previous.batch, longest + 1)
        graph = self._graph(key)
        inputs = previous.graph.inputs[:, : key[0]]
        graph.inputs[0].copy_(previous.graph.chosen[: key[0]])
        # Each live row moves one position on; padded rows (position 0, free slots) stay where they are.
        graph.inputs[1].copy_(inputs[1] + (inputs[1] > 0))
        self._play(graph, key[1])
        self._pick(graph, previous.batch, pick)
        return self._read_back(graph, previous.batch)

    @staticmethod
    def _pick(graph: _Graph, batch: int, pick: Pick | None) -> None:
        if pick is not None:
            graph.chosen[:batch].copy_(pick(graph.logits[:batch]))

    def read(self, launched: Launched) -> list[int]:
        """The tokens chosen by a launched step; waits for it if it is still running."""
        if launched.done is not None:
            launched.done.synchronize()
        return launched.host[: launched.batch].tolist()

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor | None:
        """Logits (1, V) at the last of one prompt's embeddings (1, L, D), its keys and values in slot 0.

        Only for an idle engine: slot 0 must be free, since the padded positions past the prompt
        are written too (the decode steps overwrite them before anything attends to them).
        None when no graph serves this prompt (transformers' layers, or a prompt too long).
        """
        length = embeds.shape[1]
        bucket = -(-length // PREFILL_STEP) * PREFILL_STEP
        if self.fused is None or bucket > min(PREFILL_MAX, self.cache.max_len):
            return None
        entry = self.prefills.get(bucket)
        if entry is None:
            entry = self.prefills[bucket] = self._build_prefill(bucket)
        entry.embeds[:, :length].copy_(embeds)
        entry.embeds[:, length:].zero_()
        entry.length.fill_(length)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            self._prefill_step(entry)
        return entry.logits

    def _prefill_step(self, entry: _Prefill) -> None:
        width = entry.embeds.shape[1]
        steps = torch.arange(width, device=entry.embeds.device)
        mask = prompt_mask(entry.length, width)  # (1, 1, Lb, Lb)
        rows = torch.zeros(1, dtype=torch.long, device=steps.device)
        hidden = self.fused.hidden(entry.embeds, steps.view(1, -1), mask, self.cache, rows, 0)
        entry.logits.copy_(self.fused.logits(hidden[0].index_select(0, entry.length - 1)))

    def _build_prefill(self, width: int) -> _Prefill:
        device = self.model.device
        entry = _Prefill(
            embeds=torch.zeros(
                1, width, self.model.config.text["hidden_size"], dtype=self.model.dtype, device=device
            ),
            length=torch.full((1,), width, dtype=torch.long, device=device),
            logits=torch.zeros(1, self.model.config.vocab_size, dtype=self.model.dtype, device=device),
            graph=None,
        )
        entry.graph = self._capture(lambda: self._prefill_step(entry), f"a prefill graph for {width} tokens")
        return entry

    def _read_back(self, graph: _Graph, batch: int) -> Launched:
        host = self._host[self._turn]
        self._turn ^= 1
        host[:batch].copy_(graph.chosen[:batch], non_blocking=True)
        done = None
        if self.capture:
            done = torch.cuda.Event()
            done.record()
        return Launched(graph=graph, batch=batch, host=host, done=done)

    def _graph(self, key: tuple[int, int]) -> _Graph:
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._build(*key)
        return graph

    def _replay(self, tokens: list[int], positions: list[int]) -> _Graph:
        batch = len(tokens)
        key = self.buckets(batch, max(positions) + 1)
        graph = self._graph(key)
        bb = key[0]
        # One host-to-device copy of both inputs, padded rows at token 0, position 0 (free slots).
        staging = self._staging[:, :bb]
        staging.zero_()
        staging[0, :batch] = torch.tensor(tokens)
        staging[1, :batch] = torch.tensor(positions)
        graph.inputs.copy_(staging, non_blocking=True)
        self._play(graph, key[1])
        return graph

    def _play(self, graph: _Graph, span: int) -> None:
        if graph.graph is not None:
            graph.graph.replay()
        else:
            self._step(graph, span)

    def _step(self, graph: _Graph, span: int) -> None:
        bb = graph.tokens.shape[0]
        device = graph.tokens.device
        rows = torch.arange(bb, device=device)
        mask = torch.arange(span, device=device).view(1, 1, 1, -1) <= graph.positions.view(-1, 1, 1, 1)
        embeds = self.model.embed_text(graph.tokens)
        if self.fused is not None:
            hidden = self.fused.hidden(embeds, graph.positions, mask, self.cache, rows, 0)
            graph.logits.copy_(self.fused.logits(hidden[:, -1]))
        else:
            self._transformers_step(graph, embeds, rows, mask, span)
        graph.chosen.copy_(graph.logits.argmax(dim=-1))

    def _transformers_step(self, graph: _Graph, embeds, rows, mask, span: int) -> None:
        self.cache.set_step(rows, graph.positions, 0, span)
        out = self.model.language_model(
            inputs_embeds=embeds,
            position_ids=graph.positions,
            attention_mask=mask,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        graph.logits.copy_(out.logits[:, -1])

    def _build(self, bb: int, span: int) -> _Graph:
        device = self.model.device
        vocab = self.model.config.vocab_size
        inputs = torch.zeros(2, bb, dtype=torch.long, device=device)
        # Warm-up and capture write at the last position of the span, which no active row has passed.
        inputs[1].fill_(span - 1)
        graph = _Graph(
            inputs=inputs,
            logits=torch.zeros(bb, vocab, dtype=self.model.dtype, device=device),
            chosen=torch.zeros(bb, dtype=torch.long, device=device),
            graph=None,
        )
        graph.graph = self._capture(
            lambda: self._step(graph, span), f"a decode graph for batch {bb}, span {span}"
        )
        return graph

    def _capture(self, step, what: str) -> torch.cuda.CUDAGraph | None:
        """``step`` warmed up twice (compiling it for these shapes), then captured; None if it cannot be."""
        if not self.capture or self.failed:
            return None
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph, pool=self.pool):
                step()
        except Exception:
            log.exception("CUDA graph capture failed; running steps eagerly")
            self.failed = True
            return None
        log.info("captured %s", what)
        return cuda_graph


class VisionGraphs:
    """The vision encoder and abstractor as CUDA graphs, one per image-count bucket (1, 2, 4, ...)."""

    def __init__(self, model, max_images: int = 64):
        self.model = model
        self.max_images = max_images
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.failed = False

    def run(self, pixels: torch.Tensor) -> torch.Tensor:
        count = pixels.shape[0]
        if self.failed or count > self.max_images:
            return self.model.encode_images(pixels)
        bucket = 1
        while bucket < count:
            bucket *= 2
        entry = self.graphs.get(bucket) or self._capture(bucket, pixels.shape[1:])
        if entry is None:
            return self.model.encode_images(pixels)
        static_in, static_out, graph = entry
        static_in[:count].copy_(pixels, non_blocking=True)
        graph.replay()
        return static_out[:count]

    def _capture(self, bucket: int, shape):
        device = self.model.device
        static_in = torch.zeros(bucket, *shape, device=device, dtype=self.model.dtype)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.model.encode_images(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = self.model.encode_images(static_in)
        except Exception:
            log.exception("CUDA graph capture of the vision encoder failed; encoding eagerly")
            self.failed = True
            return None
        self.graphs[bucket] = (static_in, static_out, graph)
        return self.graphs[bucket]
