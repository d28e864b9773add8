"""Every published layout loads through one path and gives the same logits; bad files fail clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from interface import get_model
from owl import preset
from owl.checkpoint import CheckpointError, load, save_export
from tests.conftest import make_tiny


def logits_of(model, num_images: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    slots = model.config.num_image_tokens
    ids = [1, 5, 6, *[-1] * slots, 7, 8, *[-1] * slots, 9][: 5 + num_images * (slots + 2)]
    pixels = torch.randn(num_images, 3, 56, 56, generator=generator)
    with torch.no_grad():
        return model(torch.tensor([ids]), pixels).logits


def with_published_buffers(model, state: dict) -> dict:
    """Add the buffers 2023 checkpoints carried (RoPE tables; position ids in the first release)."""
    state = dict(state)
    for n in range(model.config.text["num_hidden_layers"]):
        state[f"language_model.model.layers.{n}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    if model.config.layout == "v0":
        state["vision_model.embeddings.position_ids"] = torch.arange(17).unsqueeze(0)
    return state


def published_state(model) -> dict:
    return with_published_buffers(
        model, {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}
    )


def test_first_release_pth_with_config_beside_it(tmp_path, tokenizer_file):
    model = make_tiny("tiny-v0", seed=3)
    torch.save(published_state(model), tmp_path / "instruction_tuned.pth")
    model.config.save(tmp_path / "config.json")
    loaded_model, tokenizer, processor = get_model(
        str(tmp_path / "instruction_tuned.pth"), str(tokenizer_file)
    )
    assert loaded_model.config.layout == "v0"
    assert loaded_model.config.abstractor.num_attention_heads == 2
    assert torch.equal(logits_of(loaded_model), logits_of(model))
    assert tokenizer.encode("Red.") and processor.image_size == 56


def test_hub_folder_with_sharded_bin_and_index(tmp_path, tokenizer_file):
    model = make_tiny("tiny", seed=4)
    state = published_state(model)
    keys = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
        "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for shard, names in shards.items():
        torch.save({k: state[k] for k in names}, tmp_path / shard)
        weight_map.update(dict.fromkeys(names, shard))
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    hub_config = model.config.to_hub_dict()
    del hub_config["owl_layout"], hub_config["owl_name"]  # published files have neither
    (tmp_path / "config.json").write_text(json.dumps(hub_config))
    shutil.copyfile(tokenizer_file, tmp_path / "tokenizer.model")
    loaded_model, _, _ = get_model(str(tmp_path))
    assert torch.equal(logits_of(loaded_model), logits_of(model))


def test_safetensors_export_reloads_bit_for_bit(tiny_model, tiny_export):
    loaded = load(tiny_export)
    original = {k: v for k, v in tiny_model.state_dict().items() if "rotary" not in k}
    reloaded = {k: v for k, v in loaded.model.state_dict().items() if "rotary" not in k}
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    assert torch.equal(logits_of(loaded.model), logits_of(tiny_model))


def test_the_same_weights_make_the_same_file_in_every_process(tmp_path, tiny_export):
    """safetensors writes its metadata in an order that changes from process to process; ours is
    sorted, so the same tensors and metadata saved in three processes make one file byte for byte
    (a rebuilt model is checked by its checksum), and it reads back whole."""
    import subprocess
    import sys

    from safetensors import safe_open

    metadata = {name: name.upper() for name in ("owl_layout", "format", "b", "e", "a", "d")}
    metadata["c"] = "größer, grün"  # written as UTF-8, as the library writes it, not escaped (longer)
    script = (
        "import sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from owl.checkpoint import sort_safetensors_metadata\n"
        "tensors = {'w': torch.arange(6.0).reshape(2, 3), 'b': torch.ones(3)}\n"
        f"save_file(tensors, sys.argv[1], metadata={metadata!r})\n"
        "sort_safetensors_metadata(sys.argv[1])\n"
    )
    paths = [tmp_path / f"{n}.safetensors" for n in range(3)]
    runs = [subprocess.Popen([sys.executable, "-c", script, str(path)]) for path in paths]
    assert [run.wait(timeout=120) for run in runs] == [0, 0, 0]
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    with safe_open(str(paths[0]), "pt") as file:
        assert file.metadata() == metadata
        assert torch.equal(file.get_tensor("w"), torch.arange(6.0).reshape(2, 3))
    header = (tiny_export / "model.safetensors").read_bytes()[8:80]
    assert header.startswith(b'{"__metadata__":{"format":"pt","owl_layout":"hub"}')  # save_export's


def test_sharded_safetensors_with_index(tmp_path, tiny_model, tokenizer_file):
    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items() if "rotary" not in k}
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:40]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[40:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {
        k: "model-00001-of-00002.safetensors" if i < 40 else "model-00002-of-00002.safetensors"
        for i, k in enumerate(keys)
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tiny_model.config.save(tmp_path / "config.json")
    loaded = load(tmp_path, tokenizer=tokenizer_file)
    assert torch.equal(logits_of(loaded.model), logits_of(tiny_model))


def _folder_with(tmp_path, tiny_model, tokenizer_file, state):
    torch.save(state, tmp_path / "pytorch_model.bin")
    tiny_model.config.save(tmp_path / "config.json")
    shutil.copyfile(tokenizer_file, tmp_path / "tokenizer.model")
    return tmp_path


def test_missing_key_is_named(tmp_path, tiny_model, tokenizer_file):
    state = published_state(tiny_model)
    del state["abstractor.vit_eos"]
    folder = _folder_with(tmp_path, tiny_model, tokenizer_file, state)
    with pytest.raises(CheckpointError, match=r"(?s)1 keys missing.*abstractor\.vit_eos"):
        load(folder)


def test_unexpected_key_is_named(tmp_path, tiny_model, tokenizer_file):
    state = published_state(tiny_model)
    state["abstractor.encoder.layers.0.crossattention.attention.bias_k"] = torch.zeros(1, 1, 32)
    folder = _folder_with(tmp_path, tiny_model, tokenizer_file, state)
    with pytest.raises(CheckpointError, match=r"(?s)unexpected keys.*crossattention\.attention\.bias_k"):
        load(folder)


def test_wrong_shape_is_named_with_both_shapes(tmp_path, tiny_model, tokenizer_file):
    state = published_state(tiny_model)
    state["abstractor.visual_fc.bias"] = torch.zeros(65)
    folder = _folder_with(tmp_path, tiny_model, tokenizer_file, state)
    with pytest.raises(
        CheckpointError, match=r"abstractor\.visual_fc\.bias: checkpoint \(65,\), model \(64,\)"
    ):
        load(folder)


class _RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, tiny_model, tokenizer_file):
    marker = tmp_path / "code-ran"
    state = published_state(tiny_model)
    state["evil"] = _RunsCode(marker)
    torch.save(state, tmp_path / "model.pth")
    tiny_model.config.save(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="refused to load model.pth"):
        load(tmp_path / "model.pth", tokenizer=tokenizer_file)
    assert not marker.exists()


def test_pth_without_config_uses_first_release_defaults(tmp_path):
    torch.save({"vision_model.embeddings.class_embedding": torch.zeros(32)}, tmp_path / "tiny.pth")
    with pytest.raises(
        CheckpointError,
        match=r"(?s)mplug-owl-7b-v0.*vision_model\.embeddings\.class_embedding: checkpoint \(32,\), model \(1024,\)",
    ):
        load(tmp_path / "tiny.pth", tokenizer="unused", device="meta")


def test_unreachable_hub_id_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CheckpointError, match="could not get MAGAer13/mplug-owl-llama-7b.*pass a local folder"
    ):
        load("MAGAer13/mplug-owl-llama-7b")


def test_missing_tokenizer_says_which_flag(tmp_path, tiny_model):
    save_export(tiny_model, None, tmp_path)
    with pytest.raises(ValueError, match="pass --tokenizer PATH"):
        load(tmp_path)


def test_dtype_is_applied_while_loading(tiny_export):
    loaded = load(tiny_export, dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model.language_model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_random_weights_take_their_architecture_from_config(tmp_path):
    assert load("random:tiny").config.max_positions == 256
    longer = preset("tiny")
    longer = longer.replace(text={**longer.text, "max_position_embeddings": 4096})
    longer.save(tmp_path / "config.json")
    loaded = load("random:tiny", config=tmp_path / "config.json")
    assert loaded.config.max_positions == 4096
    assert load("random:tiny", config="tiny-v0").config.layout == "v0"
