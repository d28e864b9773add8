"""owl.fused: the engine's LLaMA layers compute what transformers computes, compiled or not."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

from owl.checkpoint import load, save_export
from owl.engine import Engine, EngineSettings, SlotCache
from owl.fused import FusedLlama, decoder_layer
from owl.model import OwlModel
from owl.processing import encode_prompt
from owl.sampling import GenerationParams
from tests.conftest import make_tiny
from tests.test_engine import alone


@pytest.fixture
def fresh_model():
    """A model of its own: building FusedLlama rearranges the weights' storage."""
    return make_tiny("tiny", seed=5)


def prefill_inputs(lengths: list[int], hidden: int, first: int = 0):
    """Right-padded prompts of these lengths, as the engine prefills them: embeds, positions, mask, rows."""
    width = max(lengths)
    steps = torch.arange(width)
    positions = steps.expand(len(lengths), width)
    valid = positions < torch.tensor(lengths).view(-1, 1)
    mask = ((steps.view(1, width, 1) >= steps.view(1, 1, width)) & valid.view(-1, 1, width)).unsqueeze(1)
    embeds = torch.randn(len(lengths), width, hidden, generator=torch.Generator().manual_seed(len(lengths)))
    return embeds, positions, mask, torch.arange(first, first + len(lengths))


def transformers_hidden(lm, cache, embeds, positions, mask, rows, first):
    cache.set_step(rows, positions, first, mask.shape[-1])
    return lm.model(
        inputs_embeds=embeds, position_ids=positions, attention_mask=mask, cache=cache, use_cache=True
    ).last_hidden_state


@pytest.mark.parametrize("layer, atol", [("as a GPU runs it", 1e-6), ("as a CPU runs it", 1e-5)])
def test_fused_layers_compute_what_transformers_computes(fresh_model, layer, atol):
    """Op for op with ``F.linear``, as a GPU runs the layer; on a CPU (the default here) a few rows'
    products run with the weights on the left, the same to float32's rounding."""
    lm = fresh_model.language_model
    config = lm.config
    caches = [SlotCache(config, 4, 64, torch.device("cpu"), torch.float32) for _ in range(2)]
    fused = FusedLlama(lm)
    if layer == "as a GPU runs it":
        fused.layer = decoder_layer
    with torch.no_grad():
        # Prefill two prompts of different lengths into slots 1 and 2, then one decode step of both.
        embeds, positions, mask, rows = prefill_inputs([7, 11], config.hidden_size, first=1)
        expected = transformers_hidden(lm, caches[0], embeds, positions, mask, rows, 1)
        got = fused.hidden(embeds, positions, mask, caches[1], rows, 1)
        torch.testing.assert_close(got, expected, rtol=0, atol=atol)
        step = torch.tensor([[7], [11]])
        step_mask = torch.arange(16).view(1, 1, 1, -1) <= step.view(-1, 1, 1, 1)
        token = torch.randn(2, 1, config.hidden_size)
        expected = transformers_hidden(lm, caches[0], token, step, step_mask, rows, 1)
        got = fused.hidden(token, step, step_mask, caches[1], rows, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    for layer in range(config.num_hidden_layers):
        torch.testing.assert_close(caches[1].keys[layer], caches[0].keys[layer], rtol=0, atol=atol)
        torch.testing.assert_close(caches[1].values[layer], caches[0].values[layer], rtol=0, atol=atol)
    assert caches[1].keys[0][1:3, :, :12].abs().sum() > 0  # the prompts and the step were written


def test_the_fused_head_gives_the_models_logits_for_any_number_of_rows(fresh_model):
    """On a CPU the head multiplies a few rows with its weights on the left (faster there), one row
    or many as ``F.linear`` does; every row's logits are the language model's own."""
    fused = FusedLlama(fresh_model.language_model)
    width = fresh_model.language_model.config.hidden_size
    for rows, length in ((1, 1), (5, 1), (3, 7), (10, 7)):  # 1, 5, 21 and 70 rows
        hidden = torch.randn(rows, length, width, generator=torch.Generator().manual_seed(rows))
        expected = fresh_model.language_model.lm_head(hidden)
        got = fused.logits(hidden)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_merged_projections_share_the_models_own_weights(fresh_model, tokenizer, tmp_path):
    lm = fresh_model.language_model
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = lm(ids).logits
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    first = FusedLlama(lm)
    attention = lm.model.layers[0].self_attn
    merged = first.layers[0][1]
    assert attention.q_proj.weight.data_ptr() == merged.data_ptr()
    assert attention.v_proj.weight.data_ptr() == merged[2 * attention.q_proj.weight.shape[0]].data_ptr()
    # A second engine on the same model reuses the merged storage instead of copying again.
    assert FusedLlama(lm).layers[0][1].data_ptr() == merged.data_ptr()
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, before)
    for key, value in lm.state_dict().items():
        assert torch.equal(value, state[key]), key
    # Views into merged storage still export, and load back to the same answers.
    folder = save_export(fresh_model, tokenizer, tmp_path / "export")
    reloaded = load(folder, device="cpu", dtype="float32")
    with torch.no_grad():
        assert torch.equal(reloaded.model.language_model(ids).logits, before)


def request(tokenizer, seed: int):
    ids = encode_prompt(f"Human: <image>\nHuman: question {seed}\nAI: ", tokenizer, 9)
    return ids, torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def test_compiled_layers_give_the_same_answers_batched_as_alone(tiny_loaded):
    """torch.compile of the layer function (Inductor's C++ backend here, Triton on a GPU)."""
    requests = [request(tiny_loaded.tokenizer, seed) for seed in range(3)]
    params = GenerationParams(max_new_tokens=24, ignore_eos=True)
    expected = [alone(tiny_loaded, ids, pixels, params) for ids, pixels in requests]
    settings = EngineSettings(max_batch=4, static_decode=True, compile=True)
    with Engine(tiny_loaded, settings) as engine:
        handles = [engine.submit(ids, pixels, params) for ids, pixels in requests]
        for handle in handles:
            handle.text()
        assert engine.status()["layers"] == "fused, compiled"  # no fallback to eager happened
    assert [h.stats.tokens for h in handles] == expected


def test_a_compiler_failure_falls_back_to_the_same_function_eagerly(fresh_model, caplog):
    lm = fresh_model.language_model
    eager, compiled = FusedLlama(lm), FusedLlama(lm, compile=True)

    def broken(*args, **kwargs):
        raise RuntimeError("the compiler failed")

    compiled.layer = broken
    caches = [SlotCache(lm.config, 2, 32, torch.device("cpu"), torch.float32) for _ in range(2)]
    embeds, positions, mask, rows = prefill_inputs([5, 8], lm.config.hidden_size)
    with torch.no_grad(), caplog.at_level(logging.ERROR, logger="owl.fused"):
        got = compiled.hidden(embeds, positions, mask, caches[0], rows, 0)
        expected = eager.hidden(embeds, positions, mask, caches[1], rows, 0)
    assert torch.equal(got, expected)
    assert not compiled.compiled and "running them eagerly" in caplog.text


def test_out_of_memory_is_not_mistaken_for_a_compiler_failure(fresh_model):
    compiled = FusedLlama(fresh_model.language_model, compile=True)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    compiled.layer = out_of_memory
    cache = SlotCache(fresh_model.language_model.config, 1, 16, torch.device("cpu"), torch.float32)
    embeds, positions, mask, rows = prefill_inputs([4], fresh_model.language_model.config.hidden_size)
    with pytest.raises(torch.OutOfMemoryError):
        compiled.hidden(embeds, positions, mask, cache, rows, 0)
    assert compiled.compiled


class Int8Linear(nn.Linear):
    """Stands in for a quantized projection (bitsandbytes' layers subclass nn.Linear)."""


def test_models_the_function_does_not_cover_keep_transformers_layers(fresh_model, tiny_loaded):
    from tests.test_variants import BLOOM_TEXT

    assert FusedLlama.supports(fresh_model.language_model) is None
    bloom = OwlModel(tiny_loaded.config.replace(name="tiny-bloom", text=BLOOM_TEXT))
    assert "BloomForCausalLM" in FusedLlama.supports(bloom.language_model)
    wide = OwlModel(tiny_loaded.config.replace(text={**tiny_loaded.config.text, "head_dim": 32}))
    assert "head_dim 32" in FusedLlama.supports(wide.language_model)
    mlp = fresh_model.language_model.model.layers[1].mlp
    mlp.up_proj = Int8Linear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=False)
    assert "quantized" in FusedLlama.supports(fresh_model.language_model)
    loaded = dataclasses.replace(tiny_loaded, model=fresh_model)
    with Engine(loaded, EngineSettings(max_batch=2)) as engine:
        engine.submit(*request(loaded.tokenizer, 1), GenerationParams(max_new_tokens=4)).text()
        status = engine.status()
        assert (
            engine._fused is None and status["layers"] == "transformers" and status["requests_completed"] == 1
        )
