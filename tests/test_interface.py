"""The original API (`from interface import get_model, do_generate`) and the terminal chat."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import pytest
from PIL import Image

from interface import do_generate, generation_params, get_model
from owl.config import README_SYSTEM
from owl.processing import PromptError

PROMPT = f"{README_SYSTEM}\nHuman: <image>\nHuman: Explain why this meme is funny.\nAI: "


@pytest.fixture(scope="module")
def api(tiny_export):
    return get_model(str(tiny_export))


def test_get_model_returns_model_tokenizer_processor(api):
    model, tokenizer, processor = api
    assert model.config.name == "tiny"
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert processor.image_size == 56


def test_do_generate_takes_paths_base64_and_pil(api, tmp_path):
    model, tokenizer, processor = api
    image = Image.effect_noise((40, 40), 80).convert("RGB")
    image.save(tmp_path / "meme.png")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    answers = {
        kind: do_generate([PROMPT], [source], model, tokenizer, processor, max_new_tokens=8)
        for kind, source in [
            ("path", str(tmp_path / "meme.png")),
            ("pil", image),
            ("base64", base64.b64encode(buffer.getvalue()).decode()),
        ]
    }
    assert len(set(answers.values())) == 1 and answers["path"]


def test_max_length_keeps_its_original_meaning():
    assert generation_params(max_length=512).max_new_tokens == 511
    assert generation_params().max_new_tokens == 19  # transformers' default max_length 20
    assert generation_params(max_new_tokens=7, max_length=512).max_new_tokens == 7
    assert generation_params(do_sample=True).top_k == 50  # transformers' default, as the original inherited
    assert generation_params(max_length=512, top_k=5, do_sample=True).top_k == 5


def test_beam_search_is_refused_clearly():
    with pytest.raises(ValueError, match="beam search is not supported"):
        generation_params(num_beams=3)


def test_placeholder_count_mismatch_names_both_numbers(api):
    model, tokenizer, processor = api
    with pytest.raises(PromptError, match="1 <image> placeholders but 2 images"):
        do_generate(PROMPT, [Image.new("RGB", (4, 4))] * 2, model, tokenizer, processor)


def test_several_prompts_give_their_own_answers(api):
    model, tokenizer, processor = api
    red, blue = Image.new("RGB", (9, 9), (255, 0, 0)), Image.new("RGB", (9, 9), (0, 0, 255))
    both = do_generate([PROMPT, PROMPT], [red, blue], model, tokenizer, processor, max_new_tokens=6)
    alone = [
        do_generate(PROMPT, [image], model, tokenizer, processor, max_new_tokens=6) for image in (red, blue)
    ]
    assert both == alone


def test_cli_streams_an_answer(tiny_export, tmp_path):
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "red.png")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "owl.cli",
            "--checkpoint",
            str(tiny_export),
            "--image",
            str(tmp_path / "red.png"),
            "--max-new-tokens",
            "5",
            "What colour is it?",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_cli_interactive_chat_keeps_turns(tiny_export):
    result = subprocess.run(
        [sys.executable, "-m", "owl.cli", "--checkpoint", str(tiny_export), "--max-new-tokens", "3"],
        input="Hello\nAnd again\n/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("owl> ") == 2


def test_cli_reports_a_bad_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "owl.cli", "--checkpoint", str(tmp_path / "nope.pth"), "hi"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2 and "no checkpoint at" in result.stderr
