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
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

LENGTH_STEP = 256


@dataclass
class _Graph:
    tokens: torch.Tensor  # (bb, 1)
    positions: torch.Tensor  # (bb, 1)
    logits: torch.Tensor  # (bb, V)
    graph: torch.cuda.CUDAGraph | None


class DecodeGraphs:
    def __init__(self, model, cache, *, capture: bool | None = None):
        self.model = model
        self.cache = cache
        self.capture = model.device.type == "cuda" if capture is None else capture
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.failed = False

    def buckets(self, batch: int, longest: int) -> tuple[int, int]:
        size = 1
        while size < batch:
            size *= 2
        span = -(-longest // LENGTH_STEP) * LENGTH_STEP
        return min(size, self.cache.slots), min(span, self.cache.max_len)

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, longest: int) -> torch.Tensor:
        """Logits (B, V) for rows 0..B-1 of the slot cache: ``tokens`` at ``positions``, both (B, 1).

        ``longest`` is the largest position + 1, passed in so no value is read back from the GPU.
        """
        batch = tokens.shape[0]
        key = self.buckets(batch, longest)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._build(*key)
        graph.tokens.zero_()
        graph.positions.zero_()
        graph.tokens[:batch].copy_(tokens)
        graph.positions[:batch].copy_(positions)
        if graph.graph is not None:
            graph.graph.replay()
        else:
            self._step(graph, key[1])
        return graph.logits[:batch]

    def _step(self, graph: _Graph, span: int) -> None:
        bb = graph.tokens.shape[0]
        device = graph.tokens.device
        rows = torch.arange(bb, device=device)
        mask = torch.arange(span, device=device).view(1, 1, 1, -1) <= graph.positions.view(-1, 1, 1, 1)
        self.cache.set_step(rows, graph.positions, 0, span)
        out = self.model.language_model(
            inputs_embeds=self.model.embed_text(graph.tokens),
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
        graph = _Graph(
            tokens=torch.zeros(bb, 1, dtype=torch.long, device=device),
            # Warm-up and capture write at the last position of the span, which no active row has reached.
            positions=torch.full((bb, 1), span - 1, dtype=torch.long, device=device),
            logits=torch.zeros(bb, vocab, dtype=self.model.dtype, device=device),
            graph=None,
        )
        if not self.capture or self.failed:
            return graph
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(graph, span)
            torch.cuda.current_stream().wait_stream(stream)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph, pool=self.pool):
                self._step(graph, span)
            graph.graph = cuda_graph
            log.info("captured a decode graph for batch %d, span %d", bb, span)
        except Exception:
            log.exception("CUDA graph capture failed; decoding eagerly")
            self.failed = True
        return graph
