"""The training recipe: answer-only loss, frozen stages, the original jsonl format, resumable runs."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from owl.config import IMAGE_TOKEN_ID
from owl.processing import encode_prompt
from owl.train import (
    IGNORE,
    PatchProbe,
    TrainSettings,
    parse_args,
    set_stage,
    tokenize_as_prompted,
    tokenize_recipe,
    train,
)
from tests.conftest import make_tiny

TEXT = (
    "SYS\nHuman: <image>\nHuman: What colour is the circle?\nAI: Red.\n"
    "Human: How many shapes are there?\nAI: Three."
)


def supervised(ids, labels, tokenizer) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE and i >= 3])


def test_recipe_tokenisation_supervises_answers_and_their_end_tokens(tokenizer):
    ids, labels = tokenize_recipe(TEXT, tokenizer, 9, 512)
    assert ids[0] == tokenizer.bos_token_id and ids.count(IMAGE_TOKEN_ID) == 9
    assert [label for label in labels if label == tokenizer.eos_token_id] == [2, 2]  # one EOS per answer
    assert supervised(ids, labels, tokenizer).replace(" ", "") == "Red.Three."
    assert all(label == IGNORE for i, label in zip(ids, labels, strict=True) if i == IMAGE_TOKEN_ID)


def test_prompt_tokenisation_trains_on_the_ids_a_chat_sends(tokenizer):
    ids, labels = tokenize_as_prompted(TEXT, tokenizer, 9, 512)
    prompt = TEXT[: TEXT.rfind("AI: ") + 4]
    expected = encode_prompt(prompt, tokenizer, 9, num_images=1)
    assert ids[: len(expected)] == expected  # the very prompt the model gets at inference
    assert ids[len(expected) :] == [*tokenizer.encode("Three."), tokenizer.eos_token_id]
    assert supervised(ids, labels, tokenizer).replace(" ", "") == "Red.Three."


def test_truncation_never_cuts_an_image(tokenizer):
    ids, _ = tokenize_recipe(TEXT, tokenizer, 9, 12)
    assert ids.count(IMAGE_TOKEN_ID) in (0, 9) and len(ids) <= 12


@pytest.mark.parametrize(
    ("stage", "trains_vision", "trains_language"),
    [("all", True, True), ("pretrain", True, False), ("instruct", False, True)],
)
def test_stages_freeze_what_the_recipe_freezes(stage, trains_vision, trains_language):
    model = set_stage(make_tiny("tiny"), stage)
    named = dict(model.named_parameters())
    assert named["vision_model.embeddings.cls_token"].requires_grad is trains_vision
    assert named["abstractor.visual_fc.weight"].requires_grad is trains_vision
    assert named["language_model.lm_head.weight"].requires_grad is trains_language


def test_patch_probe_labels_the_patches_under_an_object():
    from owl.data.scenes import RenderSettings, Scene, Shape

    probe = PatchProbe(32)
    scene = Scene("white", (Shape("circle", "red", "large", 0.5, 0.5, 0.18),))
    colours, shapes = probe.labels(scene, RenderSettings(width=200, height=200), grid=8)
    centre = [27, 28, 35, 36]  # the four patches around the middle of an 8x8 grid
    assert all(probe.colours[colours[i]] == "red" and probe.shapes[shapes[i]] == "circle" for i in centre)
    assert probe.colours[colours[0]] == "background:white" and probe.shapes[shapes[0]] == "none"
    assert sum(probe.shapes[s] == "circle" for s in shapes) < 16  # only the patches under it


def colour_data(folder):
    """Four one-image conversations in the original jsonl format; returns the jsonl's path."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 200, 0), (250, 250, 0)]):
        Image.new("RGB", (40, 30), colour).save(folder / "images" / f"{i}.png")
        rows.append(
            {
                "text": f"SYS\nHuman: <image>\nHuman: What colour?\nAI: Colour {i}.",
                "image": [f"images/{i}.png"],
                "task_type": "test_sft",
            }
        )
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder / "train.jsonl"


def test_a_short_run_on_jsonl_saves_and_resumes(tmp_path, tokenizer_file):
    folder = tmp_path / "data"
    colour_data(folder)
    make_tiny("tiny").config.save(tmp_path / "config.json")
    common = [
        "--out",
        str(tmp_path / "run"),
        "--config",
        str(tmp_path / "config.json"),
        "--tokenizer",
        str(tokenizer_file),
        "--data",
        str(folder / "train.jsonl"),
        "--stage",
        "all",
        "--batch-size",
        "2",
        "--save-every",
        "2",
        "--eval-every",
        "100",
        "--lr",
        "1e-3",
        "--augment",
        "recipe",
        "--device",
        "cpu",
    ]
    first = parse_args([*common, "--steps", "2"])
    assert isinstance(first, TrainSettings)
    final = train(first)
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    state = torch.load(tmp_path / "run" / "training_state.pt", weights_only=True)
    assert state["step"] == 2
    train(parse_args([*common, "--steps", "4", "--resume"]))
    assert torch.load(tmp_path / "run" / "training_state.pt", weights_only=True)["step"] == 4


def test_lora_runs_resume_and_end_in_a_merged_model_that_loads(tmp_path, tokenizer_file):
    from owl.checkpoint import load, save_export

    base = make_tiny("tiny")
    save_export(base, None, tmp_path / "base")
    data = colour_data(tmp_path / "data")

    def run(out, steps, *extra):
        args = [
            "--out",
            str(tmp_path / out),
            "--init",
            str(tmp_path / "base"),
            "--tokenizer",
            str(tokenizer_file),
        ]
        args += ["--data", str(data), "--stage", "lora", "--batch-size", "2", "--save-every", "2"]
        args += ["--eval-every", "100", "--lr", "5e-2", "--augment", "none", "--device", "cpu"]
        return train(parse_args([*args, "--steps", str(steps), *extra]))

    straight = run("straight", 4)
    run("resumed", 2)
    resumed = run("resumed", 4, "--resume")
    assert (straight / "adapter_model.safetensors").is_file()

    merged = load(straight, tokenizer=tokenizer_file).model.state_dict()
    again = load(resumed, tokenizer=tokenizer_file).model.state_dict()
    before = base.state_dict()
    assert set(merged) == set(before)  # the plain architecture, no adapter wrappers left
    q_proj = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q_proj], before[q_proj])  # the adapters were folded in
    k_proj = "language_model.model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(merged[k_proj], before[k_proj])  # what LoRA does not adapt is untouched
    assert all(torch.equal(merged[k], again[k]) for k in merged)  # resuming changes nothing
