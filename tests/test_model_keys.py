"""The 7B presets build exactly the parameters of the published checkpoints (spec appendices 1 and 2)."""

from __future__ import annotations

import pytest
import torch

from owl.config import preset
from owl.model import OwlModel

# (key pattern, shape, count): N stands for the layer index.
VISION_V0 = [
    ("vision_model.embeddings.class_embedding", (1024,), 1),
    ("vision_model.embeddings.position_embedding", (257, 1024), 1),
    ("vision_model.embeddings.patch_embedding.weight", (1024, 588), 1),
    ("vision_model.pre_layernorm.weight", (1024,), 1),
    ("vision_model.pre_layernorm.bias", (1024,), 1),
    *[(f"vision_model.encoder.layers.N.self_attn.{p}_proj.weight", (1024, 1024), 24) for p in "kvq"],
    *[(f"vision_model.encoder.layers.N.self_attn.{p}_proj.bias", (1024,), 24) for p in "kvq"],
    ("vision_model.encoder.layers.N.self_attn.out_proj.weight", (1024, 1024), 24),
    ("vision_model.encoder.layers.N.self_attn.out_proj.bias", (1024,), 24),
    ("vision_model.encoder.layers.N.layer_norm1.weight", (1024,), 24),
    ("vision_model.encoder.layers.N.layer_norm1.bias", (1024,), 24),
    ("vision_model.encoder.layers.N.mlp.fc1.weight", (4096, 1024), 24),
    ("vision_model.encoder.layers.N.mlp.fc1.bias", (4096,), 24),
    ("vision_model.encoder.layers.N.mlp.fc2.weight", (1024, 4096), 24),
    ("vision_model.encoder.layers.N.mlp.fc2.bias", (1024,), 24),
    ("vision_model.encoder.layers.N.layer_norm2.weight", (1024,), 24),
    ("vision_model.encoder.layers.N.layer_norm2.bias", (1024,), 24),
]
VISION_HUB = [
    ("vision_model.embeddings.cls_token", (1, 1, 1024), 1),
    ("vision_model.embeddings.position_embedding", (1, 257, 1024), 1),
    ("vision_model.embeddings.patch_embed.weight", (1024, 3, 14, 14), 1),
    ("vision_model.embeddings.pre_layernorm.weight", (1024,), 1),
    ("vision_model.embeddings.pre_layernorm.bias", (1024,), 1),
    ("vision_model.encoder.layers.N.self_attn.query_key_value.weight", (3072, 1024), 24),
    ("vision_model.encoder.layers.N.self_attn.query_key_value.bias", (3072,), 24),
    ("vision_model.encoder.layers.N.self_attn.dense.weight", (1024, 1024), 24),
    ("vision_model.encoder.layers.N.self_attn.dense.bias", (1024,), 24),
    ("vision_model.encoder.layers.N.input_layernorm.weight", (1024,), 24),
    ("vision_model.encoder.layers.N.input_layernorm.bias", (1024,), 24),
    ("vision_model.encoder.layers.N.mlp.fc1.weight", (4096, 1024), 24),
    ("vision_model.encoder.layers.N.mlp.fc1.bias", (4096,), 24),
    ("vision_model.encoder.layers.N.mlp.fc2.weight", (1024, 4096), 24),
    ("vision_model.encoder.layers.N.mlp.fc2.bias", (1024,), 24),
    ("vision_model.encoder.layers.N.post_attention_layernorm.weight", (1024,), 24),
    ("vision_model.encoder.layers.N.post_attention_layernorm.bias", (1024,), 24),
]
_CROSS = "abstractor.encoder.layers.N.crossattention"
SHARED = [
    ("query_tokens", (1, 64, 1024), 1),
    ("vision_model.post_layernorm.weight", (1024,), 1),
    ("vision_model.post_layernorm.bias", (1024,), 1),
    ("abstractor.vit_eos", (1, 1, 4096), 1),
    *[(f"{_CROSS}.attention.{p}.weight", (1024, 1024), 6) for p in ("query", "key", "value")],
    *[(f"{_CROSS}.attention.{p}.bias", (1024,), 6) for p in ("query", "key", "value")],
    (f"{_CROSS}.output.out_proj.weight", (1024, 1024), 6),
    (f"{_CROSS}.output.out_proj.bias", (1024,), 6),
    (f"{_CROSS}.output.norm2.weight", (1024,), 6),
    (f"{_CROSS}.output.norm2.bias", (1024,), 6),
    (f"{_CROSS}.output.mlp.w1.weight", (2816, 1024), 6),
    (f"{_CROSS}.output.mlp.w1.bias", (2816,), 6),
    (f"{_CROSS}.output.mlp.w2.weight", (1024, 2816), 6),
    (f"{_CROSS}.output.mlp.w2.bias", (1024,), 6),
    (f"{_CROSS}.output.mlp.w3.weight", (2816, 1024), 6),
    (f"{_CROSS}.output.mlp.w3.bias", (2816,), 6),
    (f"{_CROSS}.output.mlp.ffn_ln.weight", (2816,), 6),
    (f"{_CROSS}.output.mlp.ffn_ln.bias", (2816,), 6),
    (f"{_CROSS}.norm1.weight", (1024,), 6),
    (f"{_CROSS}.norm1.bias", (1024,), 6),
    (f"{_CROSS}.normk.weight", (1024,), 6),
    (f"{_CROSS}.normk.bias", (1024,), 6),
    ("abstractor.visual_fc.weight", (4096, 1024), 1),
    ("abstractor.visual_fc.bias", (4096,), 1),
    ("language_model.model.embed_tokens.weight", (32000, 4096), 1),
    *[(f"language_model.model.layers.N.self_attn.{p}_proj.weight", (4096, 4096), 32) for p in "qkvo"],
    ("language_model.model.layers.N.mlp.gate_proj.weight", (11008, 4096), 32),
    ("language_model.model.layers.N.mlp.down_proj.weight", (4096, 11008), 32),
    ("language_model.model.layers.N.mlp.up_proj.weight", (11008, 4096), 32),
    ("language_model.model.layers.N.input_layernorm.weight", (4096,), 32),
    ("language_model.model.layers.N.post_attention_layernorm.weight", (4096,), 32),
    ("language_model.model.norm.weight", (4096,), 1),
    ("language_model.lm_head.weight", (32000, 4096), 1),
]
BIAS_KV = [
    (f"{_CROSS}.attention.bias_k", (1, 1, 1024), 6),
    (f"{_CROSS}.attention.bias_v", (1, 1, 1024), 6),
]
# Buffers the published files hold and our loader skips by name (recomputed, or unused).
BUFFERS_V0 = 33  # 32 rotary_emb.inv_freq + embeddings.position_ids
BUFFERS_HUB = 32


def expand(table) -> dict[str, tuple[int, ...]]:
    keys = {}
    for pattern, shape, count in table:
        for n in range(count):
            keys[pattern.replace(".N.", f".{n}.")] = shape
    return keys


@pytest.mark.parametrize(
    ("name", "table", "published_entries", "buffers"),
    [
        ("mplug-owl-7b-v0", VISION_V0 + SHARED + BIAS_KV, 863, BUFFERS_V0),
        ("mplug-owl-llama-7b", VISION_HUB + SHARED, 754, BUFFERS_HUB),
    ],
)
def test_7b_preset_has_exactly_the_published_keys_and_shapes(name, table, published_entries, buffers):
    with torch.device("meta"):
        model = OwlModel(preset(name))
    actual = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    expected = expand(table)
    assert len(expected) + buffers == published_entries
    assert sorted(set(actual) - set(expected)) == []
    assert sorted(set(expected) - set(actual)) == []
    assert {k: v for k, v in actual.items() if v != expected[k]} == {}


def test_7b_parameter_count_matches_the_release():
    with torch.device("meta"):
        model = OwlModel(preset("mplug-owl-llama-7b"))
    vision = sum(p.numel() for p in model.vision_model.parameters())
    abstractor = sum(p.numel() for p in model.abstractor.parameters())
    llm = sum(p.numel() for p in model.language_model.parameters())
    assert round(vision / 1e6, 1) == 303.2
    assert round(abstractor / 1e6, 1) == 81.4
    assert round(llm / 1e6, 1) == 6738.4


def test_head_counts_come_from_the_config():
    from owl.config import VisionConfig

    config = preset("tiny").replace(
        vision=VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8, image_size=56
        )
    )
    model = OwlModel(config.replace(abstractor=config.abstractor))
    assert model.vision_model.encoder.layers[0].self_attn.heads == 8
    assert model.abstractor.encoder.layers[0].crossattention.attention.heads == 4
