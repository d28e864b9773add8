"""Where decode and first-token time go on a GPU, with transformers' layers and with owl.fused.

    python bench/profile_decode.py --preset mplug-owl-llama-7b

Builds the model once, then for each variant (``transformers``: the LLaMA layers as
transformers runs them; ``fused``: owl.fused's layer function through torch.compile; both
inside the engine's CUDA graphs) prints: GPU ms per captured decode step at each batch size,
the same with the input copy and the token read-back, ms per token of a request through the
engine, aggregate tokens/s of concurrent requests, the time to first token and its parts, and
the kernels launched per step, and the cost of choosing tokens as the web page does by default
(sampling with penalties) with the tokens/s that decoding reaches then. Ends with the
fused/transformers ratios.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve import build, make_requests, page_params, run_engine, single_ttft
from owl.config import preset
from owl.engine import Engine, EngineSettings
from owl.params import GenerationParams
from owl.sampling import TokenHistory, choose, make_generator


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 30) -> float:
    fn()
    sync()
    started = time.monotonic()
    for _ in range(repeats):
        fn()
    sync()
    return 1000 * (time.monotonic() - started) / repeats


def replayer(graphs, batch: int):
    """The captured step for this batch at position 200 (on CPU, a dry run: the same step, eagerly)."""
    key = graphs.buckets(batch, 201)
    graph = graphs.graphs[key]
    return graph.graph.replay if graph.graph is not None else (lambda: graphs._step(graph, key[1]))


def profile(loaded, fused: bool, batches: list[int], max_seq_len: int, device: torch.device) -> dict:
    settings = EngineSettings(
        max_batch=max(batches),
        queue_size=max(batches) + 1,
        max_seq_len=max_seq_len,
        request_timeout_s=None,
        static_decode=True,
        fused=fused,
        compile=fused and device.type == "cuda",
    )
    row: dict = {}
    started = time.monotonic()
    with Engine(loaded, settings) as engine, torch.inference_mode():
        for batch in batches:  # every shape compiled and captured before anything is timed
            run_engine(engine, make_requests(loaded, batch, seed=7), 8)
        row["warm_up_s"] = time.monotonic() - started
        row["compiled"] = bool(engine._fused is not None and engine._fused.compiled)
        graphs = engine._graphs
        for batch in batches:
            tokens, positions = [3] * batch, [200] * batch
            graphs.run(tokens, positions)
            row[f"replay_ms_{batch}"] = timed(replayer(graphs, batch))
            row[f"io_ms_{batch}"] = timed(lambda t=tokens, p=positions: graphs.run(t, p).argmax(-1).tolist())
        handle = engine.submit(
            *make_requests(loaded, 1)[0], GenerationParams(max_new_tokens=64, ignore_eos=True)
        )
        handle.text()
        times = handle.stats.token_times
        row["engine_ms_per_token_1"] = 1000 * (times[-1] - times[0]) / (len(times) - 1)
        row["first_tokens"] = handle.stats.tokens[:64]
        for batch in batches[1:]:
            row[f"tok_s_{batch}"] = run_engine(engine, make_requests(loaded, batch, seed=batch), 64)[
                "tokens_per_s"
            ]
        page = page_params()  # the web page's default: sampling, top-k 3, top-p 0.9, no repeated 2-grams
        for batch in batches:
            logits = graphs.run([3] * batch, [200] * batch)
            histories = [TokenHistory(range(3, 259)) for _ in range(batch)]  # 256 tokens each
            generators = [make_generator(page) for _ in range(batch)]
            row[f"choose_page_ms_{batch}"] = timed(
                lambda lg=logits, b=batch, h=histories, g=generators: choose(lg, [page] * b, h, g)
            )
        for batch in batches[1:]:
            row[f"page_tok_s_{batch}"] = run_engine(
                engine, make_requests(loaded, batch, seed=batch), 64, page
            )["tokens_per_s"]
        row["ttft_ms"] = single_ttft(engine, loaded, repeats=10)
        pixels = make_requests(loaded, 1)[0][1].to(loaded.device, loaded.dtype)
        row["vision_ms"] = timed(lambda: engine._vision(pixels), 10)
        ids, _ = make_requests(loaded, 1)[0]
        embeds = engine._vision(pixels)
        request = type("Waiting", (), {"prompt_ids": ids})()
        row["prefill_ms"] = timed(lambda: engine._prefill_slots([(request, embeds)], 0), 10)
        if loaded.device.type == "cuda":
            replay = replayer(graphs, 1)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    replay()
                sync()
            events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            row["kernels_per_step"] = sum(e.count for e in events) / 5
            row["kernel_ms_per_step"] = sum(e.self_device_time_total for e in events) / 5000
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="mplug-owl-llama-7b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--variants", nargs="+", default=["transformers", "fused"])
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script (eager steps)")
    args = parser.parse_args()
    device = torch.device(args.device)
    loaded = build(preset(args.preset), device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = {}
    for variant in args.variants:
        rows[variant] = profile(loaded, variant == "fused", args.batches, args.max_seq_len, device)
        print(f"# {variant}: {rows[variant]}", flush=True)
        gc.collect()  # the engine's slot cache and graph pools go before the next variant's
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    keys = [k for k in rows[args.variants[0]] if k != "first_tokens"]
    print(f"\n{'':24}" + "".join(f"{v:>14}" for v in args.variants) + ("   ratio" if len(rows) == 2 else ""))
    for key in keys:
        values = [rows[v][key] for v in args.variants]
        line = f"{key:24}" + "".join(f"{float(x):>14.2f}" for x in values)
        if len(values) == 2 and float(values[0]):
            line += f"   {float(values[1]) / float(values[0]):.2f}x"
        print(line)
    if len(rows) == 2:
        a, b = (rows[v]["first_tokens"] for v in args.variants)
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        print(
            f"greedy tokens of one request agree for the first {same} of {len(a)} ({loaded.dtype}, random weights)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
