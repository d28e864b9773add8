"""Server settings: defaults in configs/default.toml, then OWL_* environment variables, then flags.

Each setting is one field below; the environment variable is its name upper-cased with ``OWL_``
in front (``OWL_QUEUE_SIZE=64``), which is how a HuggingFace Space or a container configures it.
Imports neither torch nor gradio.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owl.params import GenerationParams

DEFAULTS_FILE = Path(__file__).resolve().parent.parent / "configs" / "default.toml"


@dataclass
class Settings:
    # the model
    checkpoint: str | None = None  # None: the embedded model
    tokenizer: str | None = None
    config: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None  # "8bit" or "4bit"
    # the server
    host: str = "127.0.0.1"
    port: int = 7860
    auth: str | None = None  # "user:password"
    share: bool = False
    root_path: str = ""
    # the engine
    queue_size: int = 32
    max_batch: int = 8
    request_timeout_s: float = 300.0
    compile: bool = True  # on a GPU: compile the LLaMA layers (about half a minute, at start)
    # limits, each with its own message
    max_images: int = 8  # per conversation
    max_images_per_turn: int = 4
    max_upload_mb: float = 10.0
    max_image_pixels: int = 40_000_000
    max_text_chars: int = 4000
    max_new_tokens: int = 512  # the most a request may ask for
    requests_per_minute: int = 20  # per browser session or API client
    allow_image_urls: bool = False
    log_conversations: bool = False
    log_dir: str = "logs"
    # defaults of the parameters panel (the original demo's: sampling, top-k 3, top-p 0.9)
    default_max_new_tokens: int = 256
    default_do_sample: bool = True
    default_temperature: float = 1.0
    default_top_k: int = 3
    default_top_p: float = 0.9
    default_repetition_penalty: float = 1.0
    default_no_repeat_ngram_size: int = 2
    system: str | None = None  # None: the original demo's system line
    title: str = "Owl"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("checkpoint", "tokenizer", "config", "device", "dtype", "quantize", "auth", "system"):
            if getattr(self, name) == "":
                setattr(self, name, None)

    def default_params(self) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=min(self.default_max_new_tokens, self.max_new_tokens),
            do_sample=self.default_do_sample,
            temperature=self.default_temperature,
            top_k=self.default_top_k,
            top_p=self.default_top_p,
            repetition_penalty=self.default_repetition_penalty,
            no_repeat_ngram_size=self.default_no_repeat_ngram_size,
        )

    @property
    def auth_pair(self) -> tuple[str, str] | None:
        if not self.auth:
            return None
        user, sep, password = self.auth.partition(":")
        if not sep or not user or not password:
            raise ValueError("--auth takes USER:PASSWORD")
        return user, password


def _coerce(kind: Any, raw: str) -> Any:
    text = str(raw)
    kinds = str(kind)
    if "bool" in kinds:
        return text.strip().lower() in ("1", "true", "yes", "on")
    if "int" in kinds and "float" not in kinds:
        return int(text)
    if "float" in kinds:
        return float(text)
    return None if text == "" and "None" in kinds else text


def load_settings(
    overrides: dict[str, Any] | None = None,
    *,
    defaults_file: Path | None = DEFAULTS_FILE,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Defaults file, then environment, then ``overrides`` (flags); unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(Settings) if f.name != "extra"}
    values: dict[str, Any] = {}
    if defaults_file is not None and defaults_file.is_file():
        data = tomllib.loads(defaults_file.read_text())
        for section in data.values() if all(isinstance(v, dict) for v in data.values()) else [data]:
            for key, value in section.items():
                if key not in fields:
                    raise ValueError(f"{defaults_file}: unknown setting {key!r}")
                values[key] = value
    environ = os.environ if environ is None else environ
    # Gradio's own variables, which hosting platforms (HuggingFace Spaces among them) set.
    for name, gradio_name in (("host", "GRADIO_SERVER_NAME"), ("port", "GRADIO_SERVER_PORT")):
        if environ.get(gradio_name):
            values[name] = _coerce(fields[name].type, environ[gradio_name])
    if environ.get("SPACE_ID") and "GRADIO_SERVER_NAME" not in environ:
        values["host"] = "0.0.0.0"  # a Space reaches the app from outside the container
    for name, spec in fields.items():
        raw = environ.get(f"OWL_{name.upper()}")
        if raw is not None:
            values[name] = _coerce(spec.type, raw)
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ValueError(f"unknown setting {key!r}")
        if value is not None:
            values[key] = value
    return Settings(**values)
