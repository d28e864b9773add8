"""Where a decode step's time goes on a GPU: graph replay alone, with inputs, a whole engine step.

    python bench/profile_decode.py --preset mplug-owl-llama-7b

Prints ms per step for: the replay of the captured step only (GPU time), the replay with its
input copy and the read-back of the chosen token, and a whole request through the engine; then
the kernels that take the most GPU time, and the parts of the time to first token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve import build, make_requests
from owl.config import preset
from owl.engine import Engine, EngineSettings
from owl.params import GenerationParams


def timed(fn, repeats: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    started = time.monotonic()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.monotonic() - started) / repeats


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="mplug-owl-llama-7b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    loaded = build(preset(args.preset), torch.device("cuda"), torch.bfloat16)
    settings = EngineSettings(max_batch=max(args.batches), max_seq_len=1024, request_timeout_s=None)
    with Engine(loaded, settings) as engine, torch.inference_mode():
        engine.submit(
            *make_requests(loaded, 1)[0], GenerationParams(max_new_tokens=8, ignore_eos=True)
        ).text()
        graphs = engine._graphs
        for batch in args.batches:
            tokens, positions = [3] * batch, [200] * batch
            graphs.run(tokens, positions)
            graph = graphs.graphs[graphs.buckets(batch, 201)]
            replay = timed(graph.graph.replay)
            with_io = timed(lambda t=tokens, p=positions: graphs.run(t, p).argmax(-1).tolist())
            print(
                f"batch {batch}: replay only {replay:.2f} ms, with input copy and token read-back {with_io:.2f} ms",
                flush=True,
            )
        handle = engine.submit(
            *make_requests(loaded, 1)[0], GenerationParams(max_new_tokens=64, ignore_eos=True)
        )
        handle.text()
        times = handle.stats.token_times
        print(
            f"engine, one request: {1000 * (times[-1] - times[0]) / (len(times) - 1):.2f} ms per token",
            flush=True,
        )
        graph = graphs.graphs[graphs.buckets(1, 201)]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.graph.replay()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
        pixels = make_requests(loaded, 1)[0][1].to("cuda", torch.bfloat16)
        vision = timed(lambda: engine._vision(pixels), 10)
        ids, _ = make_requests(loaded, 1)[0]
        embeds = engine._vision(pixels)
        request = type("Waiting", (), {"prompt_ids": ids})()
        with torch.inference_mode():
            prefill = timed(lambda: engine._prefill_slots([(request, embeds)], 0), 10)
        print(
            f"time to first token parts: vision+abstractor {vision:.2f} ms, prefill of {len(ids)} tokens "
            f"{prefill:.2f} ms",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
