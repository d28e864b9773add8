"""Shared fixtures: a SentencePiece tokenizer trained on the spot and tiny random models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="owl-gradio-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from owl.config import DEMO_SYSTEM, README_SYSTEM

CORPUS = [
    DEMO_SYSTEM,
    README_SYSTEM,
    "Human: What colour is the circle?\nAI: Red.",
    "Human: How many shapes are there?\nAI: Three.",
    "Human: Explain why this meme is funny.\nAI: Because the cat wears a hat.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "Numbers like 2048 and 65 appear; so do ümlauts, café and 日本.",
]


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    """A LLaMA-style SentencePiece model (BPE, byte fallback, <unk>/<s>/</s> = 0/1/2), vocab 320."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("tokenizer")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return folder / "tokenizer.model"


@pytest.fixture(scope="session")
def tokenizer(tokenizer_file):
    from owl.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(tokenizer_file)


def make_tiny(name: str = "tiny", seed: int = 0, layers: int | None = None):
    """A tiny model with weights large enough that greedy choices are clear-cut; ``layers``: that
    many decoder layers instead of the preset's."""
    import torch

    from owl.checkpoint import build_model
    from owl.config import preset
    from owl.model import init_weights

    config = preset(name)
    if layers is not None:
        config = config.replace(text={**config.text, "num_hidden_layers": layers})
    model = build_model(config, device=torch.device("cpu"), dtype=torch.float32)
    return init_weights(model, seed=seed, std=0.2).eval()


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny("tiny")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model):
    """The tiny model ready for an engine, with a byte tokenizer (its answers are bytes)."""
    import torch

    from owl.checkpoint import Loaded
    from owl.processing import ImageProcessor
    from owl.tokenizer import ByteTokenizer

    return Loaded(
        model=tiny_model,
        tokenizer=ByteTokenizer(320),
        processor=ImageProcessor(56),
        config=tiny_model.config,
        name="tiny",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_model, tokenizer):
    """The tiny model in our export layout, with the test tokenizer."""
    from owl.checkpoint import save_export

    return save_export(tiny_model, tokenizer, tmp_path_factory.mktemp("export") / "tiny")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    """``python app.py`` in a subprocess on a free port; stopped when the fixture ends."""

    def __init__(self, *args: str, env: dict | None = None):
        import subprocess
        import sys
        import time
        import urllib.request

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root = Path(__file__).resolve().parent.parent
        environ = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log = tempfile.NamedTemporaryFile(prefix="owl-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, str(root / "app.py"), "--port", str(self.port), *args],
            cwd=root,
            env=environ,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {Path(self.log.name).read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not become healthy: {Path(self.log.name).read_text()[-3000:]}")

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except Exception:
            self.process.kill()
        self.log.close()


def talking_config(folder: Path, context: int, width: int = 256, layers: int = 4) -> Path:
    """config.json of the tiny preset with a wider, deeper language model: random and greedy, it keeps
    talking (no early end token); at the default size a few hundred tokens a second on two cores."""
    from owl import preset

    tiny = preset("tiny")
    text = {
        **tiny.text,
        "max_position_embeddings": context,
        "hidden_size": width,
        "intermediate_size": 2 * width,
    }
    path = folder / "config.json"
    tiny.replace(text={**text, "num_hidden_layers": layers}).save(path)
    return path


@pytest.fixture(scope="session")
def random_server(tmp_path_factory):
    """The app on a small random model with a long context. Greedy, it talks until its token budget
    runs out (sampled, it may pick the end token early), at a few hundred tokens a second: slow enough
    that Stop arrives while it is still talking, fast enough for quick tests."""
    config = talking_config(tmp_path_factory.mktemp("random-server"), context=4096)
    server = RunningServer(
        "--checkpoint",
        "random:tiny",
        "--config",
        str(config),
        "--max-new-tokens",
        "1024",
        "--max-batch",
        "4",
        env={"OWL_REQUESTS_PER_MINUTE": "0"},
    )
    yield server
    server.stop()
