"""The multilingual (BLOOM) and video checkpoints load and answer through the same code path."""

from __future__ import annotations

import torch

from owl.checkpoint import build_model, load, save_export
from owl.config import preset
from owl.engine import Engine
from owl.generation import GenerationStats, stream_generate
from owl.model import init_weights
from owl.params import GenerationParams
from tests.conftest import make_tiny

BLOOM_TEXT = {
    "model_type": "bloom",
    "vocab_size": 320,
    "hidden_size": 64,
    "n_layer": 2,
    "n_head": 4,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
    "tie_word_embeddings": True,
}


def test_bloom_language_model_splices_images_after_its_embedding_norm(tmp_path, tokenizer):
    config = preset("tiny").replace(name="tiny-bloom", text=BLOOM_TEXT)
    model = init_weights(build_model(config, device=torch.device("cpu"), dtype=torch.float32), std=0.2)
    norm = model.language_model.transformer.word_embeddings_layernorm
    ids = torch.tensor([[1, 5, *[-1] * 9, 6]])
    images = torch.randn(1, 9, 64)
    embeds = model.embed(ids, images)
    assert torch.equal(embeds[0, 2:11], images[0])  # image vectors bypass the norm
    raw = model.language_model.get_input_embeddings()(torch.tensor([[5]]))
    expected = torch.nn.functional.layer_norm(raw, (64,), norm.weight, norm.bias, norm.eps)
    assert torch.allclose(embeds[0, 1], expected[0, 0], atol=1e-6)  # text vectors do not
    assert norm(raw).equal(raw)  # and BLOOM's own call of it no longer applies it twice

    folder = save_export(model, tokenizer, tmp_path / "bloom")
    loaded = load(folder)
    assert loaded.config.text["model_type"] == "bloom"
    prompt = [1, *tokenizer.encode("Human: "), *[-1] * 9, *tokenizer.encode("\nHuman: hi\nAI: ")]
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    params = GenerationParams(max_new_tokens=12, ignore_eos=True)
    stats = GenerationStats()
    text = "".join(stream_generate(loaded.model, loaded.tokenizer, prompt, pixels, params, stats=stats))
    with Engine(loaded) as engine:  # BLOOM decodes one request at a time with transformers' cache
        handle = engine.submit(prompt, pixels, params)
        assert handle.text() == text and handle.stats.tokens == stats.tokens


def test_video_checkpoint_loads_for_images(tmp_path, tokenizer):
    """The video release adds temporal adapters that only act on several frames; images ignore them."""
    model = make_tiny("tiny", seed=5)
    state = {k: v for k, v in model.state_dict().items() if "rotary" not in k}
    state["temporal_query_tokens"] = torch.zeros(1, 8, 32)
    for n in range(2):
        state[f"vision_model.encoder.layers.{n}.temporal.ln.weight"] = torch.ones(32)
        state[f"vision_model.encoder.layers.{n}.temporal.conv.weight"] = torch.zeros(16, 1, 3, 1, 1)
    state["abstractor.temporal_visual_fc.weight"] = torch.zeros(64, 32)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model.config.save(tmp_path / "config.json")
    (tmp_path / "tokenizer.model").write_bytes(tokenizer.path.read_bytes())
    loaded = load(tmp_path)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded.model.encode_images(pixels), model.encode_images(pixels))
