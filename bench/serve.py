"""Serving benchmark: the naive baseline against the engine, on the same random-weight model.

    python bench/serve.py                                  # CPU: a ~45M-parameter model
    python bench/serve.py --preset mplug-owl-llama-7b --device cuda --concurrency 1 4 8 16 64
    python bench/serve.py --params page --new-tokens 256       # the page's default sampling

The baseline is what the original demo and LLaVA's worker do: one ``generate()`` per request,
requests served one at a time. The engine gets all requests at once. Every request has one
image and ~100 text tokens and generates exactly ``--new-tokens`` tokens (end-of-sequence
ignored, so both sides do the same work), greedily, or with ``--params page`` as the web page
asks by default (sampling with top-k 3 and top-p 0.9, no repeated 2-grams; the baseline passes
the same to ``generate()``). Printed: aggregate tokens/s, time to first token
p50/p99 (from the moment all requests arrive), per-token latency p50, and the engine/baseline
ratios, all measured in this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from owl.checkpoint import Loaded, build_model
from owl.config import LLAMA_7B_TEXT, AbstractorConfig, OwlConfig, VisionConfig, preset
from owl.engine import Engine, EngineSettings
from owl.params import GenerationParams
from owl.processing import ImageProcessor
from owl.tokenizer import ByteTokenizer

# About 45M parameters: the size the CPU comparison runs at.
CPU_BENCH = OwlConfig(
    name="bench-cpu-45m",
    vision=VisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6),
    abstractor=AbstractorConfig(
        hidden_size=384,
        num_hidden_layers=2,
        num_attention_heads=6,
        intermediate_size=1024,
        encoder_hidden_size=384,
    ),
    text={
        **LLAMA_7B_TEXT,
        "vocab_size": 8000,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
    },
    num_query_tokens=32,
)


def build(config: OwlConfig, device: torch.device, dtype: torch.dtype) -> Loaded:
    started = time.monotonic()
    model = build_model(config, device=device, dtype=dtype)
    print(
        f"# built {config.name}: {model.num_parameters() / 1e6:.1f}M parameters on {device} "
        f"({dtype}) in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    return Loaded(
        model=model,
        tokenizer=ByteTokenizer(config.vocab_size),
        processor=ImageProcessor(config.vision.image_size),
        config=config,
        name=config.name,
        device=device,
        dtype=dtype,
        random_weights=True,
    )


def make_requests(loaded: Loaded, count: int, text_tokens: int = 100, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    slots = loaded.config.num_image_tokens
    size = loaded.config.vision.image_size
    requests = []
    for _ in range(count):
        text = torch.randint(3, 259, (text_tokens,), generator=generator).tolist()
        ids = [1, *text[:20], *[-1] * slots, *text[20:]]
        requests.append((ids, torch.randn(1, 3, size, size, generator=generator)))
    return requests


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Timing:
    """A transformers streamer that records when each new token arrives."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        if value.numel():
            self.times.append(time.monotonic())

    def end(self) -> None:
        pass


def page_params() -> GenerationParams:
    """What the web page asks for unless its user changes the parameters panel (the token budget
    and end-of-sequence are set per run by ``run_engine``)."""
    from owl.settings import Settings

    return Settings().default_params()


def generate_kwargs(params: GenerationParams) -> dict:
    """The same choice as ``generate()`` arguments (transformers' own logits processors)."""
    if not params.do_sample:
        return {"do_sample": False}
    return {
        "do_sample": True,
        "temperature": params.temperature,
        "top_k": params.top_k,  # 0: off, in both
        "top_p": params.top_p,
        "repetition_penalty": params.repetition_penalty,
        "no_repeat_ngram_size": params.no_repeat_ngram_size,
    }


@torch.inference_mode()
def run_baseline(loaded: Loaded, requests, new_tokens: int, params: GenerationParams | None = None) -> dict:
    """One generate() per request, served one after another, as the original demo did."""
    model = loaded.model
    started = time.monotonic()
    ttft, gaps, tokens = [], [], 0
    for ids, pixels in requests:
        image = model.encode_images(pixels)
        embeds = model.embed(torch.tensor([ids], device=model.device), image)
        timing = _Timing()
        out = model.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            **generate_kwargs(params or GenerationParams()),
            streamer=timing,
        )
        tokens += out.shape[1]
        ttft.append(timing.times[0] - started)
        gaps += [b - a for a, b in zip(timing.times, timing.times[1:], strict=False)]
    sync(model.device)
    return _summary(tokens, time.monotonic() - started, ttft, gaps)


def run_engine(engine: Engine, requests, new_tokens: int, params: GenerationParams | None = None) -> dict:
    params = replace(params or GenerationParams(), max_new_tokens=new_tokens, ignore_eos=True)
    started = time.monotonic()
    handles = [engine.submit(ids, pixels, params) for ids, pixels in requests]
    for handle in handles:
        for _ in handle:
            pass
    elapsed = time.monotonic() - started
    ttft = [h.stats.first_token - started for h in handles]
    gaps = [
        b - a for h in handles for a, b in zip(h.stats.token_times, h.stats.token_times[1:], strict=False)
    ]
    return _summary(sum(h.stats.completion_tokens for h in handles), elapsed, ttft, gaps)


def _summary(tokens: int, seconds: float, ttft: list[float], gaps: list[float]) -> dict:
    ttft = sorted(ttft)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_ms": 1000 * ttft[len(ttft) // 2],
        "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
        "token_p50_ms": 1000 * statistics.median(gaps) if gaps else float("nan"),
    }


def single_ttft(engine: Engine, loaded: Loaded, repeats: int = 10) -> float:
    """Time to first token for one request (one image, 100 text tokens) on an idle engine, median ms."""
    times = []
    for request in make_requests(loaded, repeats, seed=99):
        handle = engine.submit(*request, GenerationParams(max_new_tokens=1, ignore_eos=True))
        handle.text()
        times.append(1000 * handle.stats.ttft_s)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="a preset name (default: the ~45M CPU benchmark model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument(
        "--baseline-max", type=int, default=16, help="skip the baseline above this concurrency"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--params", choices=["greedy", "page"], default="greedy", help="page: the web page's default sampling"
    )
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    params = page_params() if args.params == "page" else GenerationParams()
    config = preset(args.preset) if args.preset else CPU_BENCH
    loaded = build(config, device, dtype)
    settings = EngineSettings(
        max_batch=max(args.concurrency),
        queue_size=max(args.concurrency) + 1,
        max_seq_len=args.max_seq_len,
        request_timeout_s=None,
    )
    results = []
    with Engine(loaded, settings) as engine:
        # Warm up both paths (allocator, kernels, CUDA graphs for the shapes used below).
        run_baseline(loaded, make_requests(loaded, 1, seed=7), 4)
        for concurrency in sorted(set(args.concurrency)):
            run_engine(engine, make_requests(loaded, concurrency, seed=7), args.new_tokens)
        ttft_one = single_ttft(engine, loaded)
        print(
            f"# time to first token, one request (1 image + 100 text tokens), idle engine: {ttft_one:.1f} ms",
            flush=True,
        )
        for concurrency in args.concurrency:
            requests = make_requests(loaded, concurrency, seed=concurrency)
            ours = run_engine(engine, requests, args.new_tokens, params)
            base = (
                run_baseline(loaded, requests, args.new_tokens, params)
                if concurrency <= args.baseline_max
                else None
            )
            results.append({"concurrency": concurrency, "engine": ours, "baseline": base})
            _print_row(concurrency, base, ours)
    header = (
        f"\n{config.name} on {device} ({str(dtype).removeprefix('torch.')}), {args.new_tokens} new tokens "
        f"per request, 1 image + 100 text tokens each, {args.params} decoding"
    )
    print(header)
    print(
        f"{'streams':>7} | {'tok/s base':>10} {'tok/s owl':>10} {'ratio':>6} | {'TTFT p50 base':>13} "
        f"{'owl':>8} | {'TTFT p99 base':>13} {'owl':>8} | {'ms/token base':>13} {'owl':>7}"
    )
    for row in results:
        _print_row(row["concurrency"], row["baseline"], row["engine"], table=True)
    print(f"time to first token, one request on an idle engine: {ttft_one:.1f} ms")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "config": config.name,
                    "device": str(device),
                    "params": args.params,
                    "ttft_one_ms": ttft_one,
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


def _print_row(concurrency: int, base: dict | None, ours: dict, table: bool = False) -> None:
    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    b = base or {}
    ratio = ours["tokens_per_s"] / b["tokens_per_s"] if base else None
    line = (
        f"{concurrency:>7} | {fmt(b.get('tokens_per_s'), '>10.1f')} {ours['tokens_per_s']:>10.1f} "
        f"{fmt(ratio, '>5.2f')}x | {fmt(b.get('ttft_p50_ms'), '>10.0f')} ms {ours['ttft_p50_ms']:>5.0f} ms | "
        f"{fmt(b.get('ttft_p99_ms'), '>10.0f')} ms {ours['ttft_p99_ms']:>5.0f} ms | "
        f"{fmt(b.get('token_p50_ms'), '>10.2f')} ms {ours['token_p50_ms']:>4.2f} ms"
    )
    print(line if table else "# " + line, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
