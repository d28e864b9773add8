"""Owl reproduces the original 2023 code's outputs on both releases (fixtures in tests/fixtures/reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from owl.checkpoint import detect_layout, load_config, load_weights, read_keys, resolve
from owl.generation import GenerationStats, stream_generate
from owl.model import OwlModel
from owl.sampling import GenerationParams
from owl.tokenizer import ByteTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
CASES = ["one_image", "two_images", "three_images", "text_only"]
RELEASES = {"v0": FIXTURES / "v0" / "model.pth", "hub": FIXTURES / "hub"}


@pytest.fixture(scope="module", params=sorted(RELEASES))
def release(request):
    """(model loaded from the original's own files, the recorded cases)."""
    resolved = resolve(RELEASES[request.param])
    config = load_config(resolved, None, detect_layout(read_keys(resolved.weights)))
    with torch.device("meta"):
        model = OwlModel(config)
    load_weights(model, resolved.weights, device=torch.device("cpu"), dtype=torch.float32)
    return request.param, model.eval(), load_file(str(FIXTURES / request.param / "cases.safetensors"))


def test_layout_is_recognised_from_the_keys(release):
    name, model, _ = release
    assert model.config.layout == name
    assert model.config.vision.num_attention_heads == (2 if name == "v0" else 4)


@pytest.mark.parametrize("case", CASES)
def test_vision_abstractor_and_logits_match(release, case):
    _, model, cases = release
    pixels = cases.get(f"{case}.pixel_values")
    with torch.no_grad():
        image_embeds = None
        if pixels is not None:
            torch.testing.assert_close(
                model.vision_model(pixels), cases[f"{case}.vision_out"], atol=1e-5, rtol=1e-5
            )
            image_embeds = model.encode_images(pixels)
            torch.testing.assert_close(image_embeds, cases[f"{case}.image_embeds"], atol=1e-4, rtol=1e-4)
        logits = model.language_model(
            inputs_embeds=model.embed(cases[f"{case}.input_ids"], image_embeds)
        ).logits
    torch.testing.assert_close(logits, cases[f"{case}.logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_match_token_for_token(release, case):
    _, model, cases = release
    expected = cases[f"{case}.generated"][0].tolist()
    assert expected[0] == 1  # the original output starts with a synthetic BOS
    stats = GenerationStats()
    params = GenerationParams(max_new_tokens=len(expected) - 1)
    prompt = cases[f"{case}.input_ids"][0].tolist()
    tokenizer = ByteTokenizer(model.config.vocab_size)
    list(stream_generate(model, tokenizer, prompt, cases.get(f"{case}.pixel_values"), params, stats=stats))
    assert stats.tokens == expected[1:]


@pytest.mark.parametrize("static", [False, True], ids=["eager", "fixed-shape"])
def test_the_engine_reproduces_all_cases_at_once(release, static):
    """Through the serving engine's own LLaMA layers (owl.fused), batched, as a server answers."""
    from owl.checkpoint import Loaded
    from owl.engine import Engine, EngineSettings
    from owl.processing import ImageProcessor

    _, model, cases = release
    loaded = Loaded(
        model=model,
        tokenizer=ByteTokenizer(model.config.vocab_size),
        processor=ImageProcessor(model.config.vision.image_size),
        config=model.config,
        name="reference",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    expected = [cases[f"{case}.generated"][0].tolist()[1:] for case in CASES]
    with Engine(loaded, EngineSettings(max_batch=len(CASES), static_decode=static)) as engine:
        handles = [
            engine.submit(
                cases[f"{case}.input_ids"][0].tolist(),
                cases.get(f"{case}.pixel_values"),
                GenerationParams(max_new_tokens=len(tokens)),
            )
            for case, tokens in zip(CASES, expected, strict=True)
        ]
        for handle in handles:
            handle.text()
        assert engine._fused is not None
    assert [h.stats.tokens for h in handles] == expected
