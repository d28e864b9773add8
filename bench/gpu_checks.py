"""Checks that need a CUDA GPU; bench/gpu.sh runs them before the 7B benchmark.

1. The reference fixtures (outputs of the original code) reproduce token for token on the GPU.
2. The engine with CUDA-graph decode steps gives the same greedy tokens batched as alone, and
   when requests join or stop while others answer.
3. 8-bit and 4-bit weights (bitsandbytes): memory used and agreement with 16-bit logits.
Each check prints PASS or FAIL with its numbers and never stops the others.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from owl.checkpoint import Loaded, build_model, detect_layout, load_config, load_weights, read_keys, resolve  # noqa: E402
from owl.config import LLAMA_7B_TEXT, AbstractorConfig, OwlConfig, VisionConfig, preset  # noqa: E402
from owl.engine import Engine, EngineSettings  # noqa: E402
from owl.generation import GenerationStats, stream_generate  # noqa: E402
from owl.model import OwlModel, init_weights  # noqa: E402
from owl.params import GenerationParams  # noqa: E402
from owl.processing import ImageProcessor  # noqa: E402
from owl.tokenizer import ByteTokenizer  # noqa: E402

DEVICE = torch.device(os.environ.get("OWL_CHECK_DEVICE", "cuda"))  # cpu: a dry run of the checks
CHECKS = []


class Skip(Exception):
    """A check that cannot run on this machine (a missing optional package); neither pass nor fail."""


def check(name):
    def register(fn):
        CHECKS.append((name, fn))
        return fn

    return register


def run_all() -> int:
    print(
        f"torch {torch.__version__} on {torch.cuda.get_device_name() if DEVICE.type == 'cuda' else DEVICE}",
        flush=True,
    )
    failed = skipped = 0
    for name, fn in CHECKS:
        started = time.monotonic()
        try:
            ok, detail = fn()
        except Skip as skip:
            print(f"SKIP {name}: {skip}", flush=True)
            skipped += 1
            continue
        except Exception:
            ok, detail = False, traceback.format_exc(limit=6)
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name} ({time.monotonic() - started:.1f} s): {detail}", flush=True)
    print(f"{len(CHECKS) - failed - skipped} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


@check("reference fixtures reproduce token for token on the GPU (fp32)")
def reference():
    from safetensors.torch import load_file

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    fixtures = ROOT / "tests" / "fixtures" / "reference"
    details, ok = [], True
    for name, path in [("v0", fixtures / "v0" / "model.pth"), ("hub", fixtures / "hub")]:
        resolved = resolve(path)
        config = load_config(resolved, None, detect_layout(read_keys(resolved.weights)))
        with torch.device("meta"):
            model = OwlModel(config)
        load_weights(model, resolved.weights, device=DEVICE, dtype=torch.float32)
        cases = load_file(str(fixtures / name / "cases.safetensors"))
        for case in ("one_image", "two_images", "three_images", "text_only"):
            expected = cases[f"{case}.generated"][0].tolist()[1:]
            stats = GenerationStats()
            pixels = cases.get(f"{case}.pixel_values")
            list(
                stream_generate(
                    model.eval(),
                    ByteTokenizer(config.vocab_size),
                    cases[f"{case}.input_ids"][0].tolist(),
                    None if pixels is None else pixels.to(DEVICE),
                    GenerationParams(max_new_tokens=len(expected)),
                    stats=stats,
                )
            )
            same = stats.tokens == expected
            ok &= same
            details.append(f"{name}/{case}={'equal' if same else 'DIFFERENT'}")
    return ok, ", ".join(details)


def tiny_loaded(dtype=torch.float32) -> Loaded:
    model = build_model(preset("tiny"), device=DEVICE, dtype=dtype)
    init_weights(model, seed=0, std=0.2)
    return Loaded(
        model=model,
        tokenizer=ByteTokenizer(320),
        processor=ImageProcessor(56),
        config=model.config,
        name="tiny",
        device=DEVICE,
        dtype=dtype,
    )


def tiny_requests(count: int, seed: int, lengths) -> list:
    """Prompts for ``tiny_loaded``: BOS, ``lengths(i)`` random text ids, one image, two more ids."""
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(count):
        ids = [1, *torch.randint(3, 300, (lengths(i),), generator=generator).tolist(), *[-1] * 9, 5, 6]
        requests.append((ids, torch.randn(1, 3, 56, 56, generator=generator)))
    return requests


def alone_tokens(loaded: Loaded, requests, params: GenerationParams) -> list[list[int]]:
    """Each request's tokens generated on its own, without the engine."""
    tokens = []
    for ids, pixels in requests:
        stats = GenerationStats()
        list(stream_generate(loaded.model, loaded.tokenizer, ids, pixels, params, stats=stats))
        tokens.append(stats.tokens)
    return tokens


@check("engine with compiled fused layers in CUDA graphs: batched greedy equals alone (fp32)")
def graphs():
    loaded = tiny_loaded()
    requests = tiny_requests(6, 0, lambda i: 12 + i)
    params = GenerationParams(max_new_tokens=40, ignore_eos=True)
    alone = alone_tokens(loaded, requests, params)
    with Engine(loaded, EngineSettings(max_batch=4, static_decode=True)) as engine:
        handles = [engine.submit(ids, pixels, params) for ids, pixels in requests]
        for handle in handles:
            handle.text()
        captured = [key for key, graph in engine._graphs.graphs.items() if graph.graph is not None]
        compiled = engine._fused is not None and engine._fused.compiled
    same = sum(h.stats.tokens == a for h, a in zip(handles, alone, strict=True))
    # A CPU dry run checks the same steps, uncaptured and uncompiled.
    wanted = DEVICE.type != "cuda" or (bool(captured) and compiled)
    return (
        same == len(requests) and wanted,
        f"{same}/{len(requests)} equal; graphs captured for {captured}; layers compiled: {compiled}",
    )


@check("engine in CUDA graphs: requests that join or stop while others answer change no one's tokens (fp32)")
def arrivals():
    loaded = tiny_loaded()
    requests = tiny_requests(5, 1, lambda i: 10 + 3 * i)
    params = GenerationParams(max_new_tokens=60, ignore_eos=True)
    alone = alone_tokens(loaded, requests[:4], params)
    with Engine(loaded, EngineSettings(max_batch=4, static_decode=True)) as engine:
        handles, streams = [], []
        for ids, pixels in requests[:4]:  # each arrives once the ones before it have streamed 5 more pieces
            for stream in streams:
                for _ in range(5):
                    next(stream)
            handles.append(engine.submit(ids, pixels, params))
            streams.append(iter(handles[-1]))
            next(streams[-1])
            if len(handles) == 2:  # and one is stopped while they answer
                stopped = engine.submit(*requests[4], replace(params, max_new_tokens=500))
                next(iter(stopped))
                stopped.cancel()
        for handle in handles:
            handle.text()
        stopped.done.wait(10)
        compiled = engine._fused is not None and engine._fused.compiled
    same = sum(h.stats.tokens == a for h, a in zip(handles, alone, strict=True))
    reasons = [h.stats.finish_reason for h in handles]
    wanted = DEVICE.type != "cuda" or compiled
    return (
        same == len(alone)
        and reasons == ["length"] * 4
        and stopped.stats.finish_reason == "cancelled"
        and wanted,
        f"{same}/{len(alone)} equal to alone; finished {reasons}, the stopped one "
        f"{stopped.stats.finish_reason}; layers compiled: {compiled}",
    )


MID = OwlConfig(
    name="mid-0.4b",
    vision=VisionConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8),
    abstractor=AbstractorConfig(
        hidden_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        intermediate_size=1408,
        encoder_hidden_size=512,
    ),
    text={
        **LLAMA_7B_TEXT,
        "hidden_size": 1536,
        "intermediate_size": 4096,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    num_query_tokens=64,
)


@check("8-bit and 4-bit language model weights (bitsandbytes)")
def quantized():
    from owl.quantize import quantize_language_model

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Skip("bitsandbytes is not installed") from None

    ids = torch.tensor([[1, *range(100, 160), *[-1] * MID.num_image_tokens, *range(200, 230)]], device=DEVICE)
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    details, reference_logits, ok = [], None, True
    for bits in (16, 8, 4):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        started = time.monotonic()
        model = build_model(MID, device=torch.device("cpu"), dtype=torch.float32)
        init_weights(model, seed=3, std=0.02)
        model = model.to(torch.float16)
        print(f"  built {MID.name} for {bits}-bit in {time.monotonic() - started:.0f} s", flush=True)
        if bits == 16:
            model.to(DEVICE)
        else:
            quantize_language_model(model, bits=bits, device=DEVICE)
        used = (torch.cuda.memory_allocated() - before) / 2**20
        with torch.inference_mode():
            logits = model(ids, pixels).logits[0, -20:].float()
        if reference_logits is None:
            reference_logits = logits
            agreement = 1.0
        else:
            agreement = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
        finite = bool(torch.isfinite(logits).all())
        ok &= finite
        details.append(
            f"{bits}-bit: {used:.0f} MiB, top-1 agreement with 16-bit {agreement:.0%}, finite={finite}"
        )
        del model
    return ok, "; ".join(details)


if __name__ == "__main__":
    raise SystemExit(run_all())
