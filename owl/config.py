"""Typed configuration for mPLUG-Owl models, with named presets.

Two layouts of the same architecture exist:

* ``"hub"``: the HuggingFace release (``MAGAer13/mplug-owl-llama-7b`` and siblings). Vision keys
  ``cls_token``/``patch_embed``/fused ``query_key_value``; 16 heads in vision and abstractor.
* ``"v0"``: the first release (a single ``.pth``). CLIP-style vision keys, separate q/k/v
  projections, 8 heads, and a learned extra key/value slot (``bias_k``/``bias_v``) in every
  abstractor layer.

This module imports neither torch nor transformers, so the app and the CLI can read configs
cheaply. ``OwlConfig.from_hub_dict`` reads a published ``config.json``; ``to_hub_dict`` writes one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Layout = Literal["hub", "v0"]
LAYOUTS: tuple[str, ...] = ("hub", "v0")

IMAGE_TOKEN = "<image>"
# Prompt ids use this value for every image slot; it never reaches an embedding table.
IMAGE_TOKEN_ID = -1

# CLIP normalisation, as used by every released checkpoint.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The system line of the original web demo, the default of our conversations.
DEMO_SYSTEM = (
    "The following is a conversation between a curious human and AI. "
    "The AI gives helpful, detailed, and polite answers to the human's questions."
)
# The variant used by the original README and Python interface.
README_SYSTEM = (
    "The following is a conversation between a curious human and AI assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class ConfigError(ValueError):
    """A configuration that cannot describe a working model; the message says how to fix it."""


@dataclass(frozen=True)
class VisionConfig:
    """ViT-L/14-shaped image encoder."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_heads("vision", self.hidden_size, self.num_attention_heads)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return self.num_patches + 1


@dataclass(frozen=True)
class AbstractorConfig:
    """The visual abstractor: learned queries cross-attending to the image tokens."""

    hidden_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 16
    # Width of the SwiGLU MLP; the published checkpoints store 2816.
    intermediate_size: int = 2816
    # Width of the image features the keys and values are computed from (the vision width).
    encoder_hidden_size: int = 1024
    # eps of the LayerNorm inside the MLP (`ffn_ln`); norm1/normk/norm2 use torch's default 1e-5.
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.1

    def __post_init__(self) -> None:
        _check_heads("abstractor", self.hidden_size, self.num_attention_heads)


@dataclass(frozen=True)
class OwlConfig:
    """The whole model: vision encoder, abstractor, and a HuggingFace causal language model.

    ``text`` is the language model's HuggingFace config as a plain dict (``model_type`` "llama" or
    "bloom"), exactly as it appears under ``text_config`` in a published ``config.json``.
    """

    name: str
    layout: Layout = "hub"
    vision: VisionConfig = field(default_factory=VisionConfig)
    abstractor: AbstractorConfig = field(default_factory=AbstractorConfig)
    text: dict[str, Any] = field(default_factory=lambda: dict(LLAMA_7B_TEXT))
    num_query_tokens: int = 64

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.abstractor.encoder_hidden_size != self.vision.hidden_size:
            raise ConfigError(
                f"abstractor encoder_hidden_size {self.abstractor.encoder_hidden_size} must equal the "
                f"vision hidden_size {self.vision.hidden_size}: the abstractor reads the vision tokens"
            )
        if self.text.get("model_type") not in ("llama", "bloom"):
            raise ConfigError(
                f"text model_type {self.text.get('model_type')!r} is not supported; use 'llama' or 'bloom'"
            )
        if self.num_query_tokens < 1:
            raise ConfigError(f"num_query_tokens must be positive, got {self.num_query_tokens}")

    # Derived values, computed in one place.
    @property
    def num_image_tokens(self) -> int:
        """Language-model positions per image: the abstractor queries plus one learned end vector."""
        return self.num_query_tokens + 1

    @property
    def text_hidden_size(self) -> int:
        return int(self.text.get("hidden_size", self.text.get("n_embed", 0)))

    @property
    def max_positions(self) -> int | None:
        """The language model's context length (None for ALiBi models without a fixed limit)."""
        value = self.text.get("max_position_embeddings")
        return int(value) if value else None

    @property
    def vocab_size(self) -> int:
        return int(self.text["vocab_size"])

    @property
    def bos_token_id(self) -> int:
        return int(self.text.get("bos_token_id", 1))

    @property
    def eos_token_id(self) -> int:
        return int(self.text.get("eos_token_id", 2))

    def replace(self, **changes: Any) -> OwlConfig:
        return dataclasses.replace(self, **changes)

    # --- the published config.json schema -------------------------------------------------------
    def to_hub_dict(self) -> dict[str, Any]:
        """A ``config.json`` in the schema of the HuggingFace release, plus our ``owl_layout`` key."""
        v, a = self.vision, self.abstractor
        return {
            "architectures": ["MplugOwlForConditionalGeneration"],
            "model_type": "mplug-owl",
            "owl_layout": self.layout,
            "owl_name": self.name,
            "num_query_tokens": self.num_query_tokens,
            "vision_config": {
                "model_type": "mplug_owl_vision_model",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.num_attention_heads,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": v.num_channels,
                "layer_norm_eps": v.layer_norm_eps,
                "hidden_act": "quick_gelu",
            },
            "visual_abstractor_config": {
                "model_type": "mplug_owl_visual_abstract",
                "hidden_size": a.hidden_size,
                "num_hidden_layers": a.num_hidden_layers,
                "num_attention_heads": a.num_attention_heads,
                "intermediate_size": a.intermediate_size,
                "encoder_hidden_size": a.encoder_hidden_size,
                "layer_norm_eps": a.layer_norm_eps,
                "attention_probs_dropout_prob": a.attention_dropout,
            },
            "text_config": dict(self.text),
        }

    @classmethod
    def from_hub_dict(
        cls, data: dict[str, Any], *, name: str = "custom", layout: Layout | None = None
    ) -> OwlConfig:
        """Read a published ``config.json``. Missing sub-config fields take the release's code defaults."""
        if "text_config" not in data:
            raise ConfigError(
                "config.json has no 'text_config': this is not an mPLUG-Owl config "
                "(expected the schema of MAGAer13/mplug-owl-llama-7b)"
            )
        vision_data = data.get("vision_config") or {}
        # The first release named the abstractor section `abstractor_config`.
        abstractor_data = data.get("visual_abstractor_config") or data.get("abstractor_config") or {}
        vision = _pick(VisionConfig, vision_data)
        abstractor_fields = _pick_fields(AbstractorConfig, abstractor_data)
        if "attention_probs_dropout_prob" in abstractor_data:
            abstractor_fields["attention_dropout"] = float(abstractor_data["attention_probs_dropout_prob"])
        abstractor_fields.setdefault("encoder_hidden_size", vision.hidden_size)
        abstractor = AbstractorConfig(**abstractor_fields)
        text = dict(data["text_config"])
        text.setdefault("model_type", "llama")
        return cls(
            name=str(data.get("owl_name", name)),
            layout=layout or data.get("owl_layout", "hub"),
            vision=vision,
            abstractor=abstractor,
            text=text,
            num_query_tokens=int(data.get("num_query_tokens", 64)),
        )

    @classmethod
    def from_json_file(cls, path: str | Path, *, layout: Layout | None = None) -> OwlConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        return cls.from_hub_dict(data, name=path.parent.name or "custom", layout=layout)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hub_dict(), indent=2) + "\n")


def _check_heads(part: str, hidden: int, heads: int) -> None:
    if heads < 1 or hidden % heads:
        raise ConfigError(f"{part} hidden_size {hidden} is not divisible by num_attention_heads {heads}")


def _pick_fields(kind: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(kind)}
    return {key: value for key, value in data.items() if key in names}


def _pick(kind: type, data: dict[str, Any]) -> Any:
    return kind(**_pick_fields(kind, data))


# --- presets -------------------------------------------------------------------------------------

# LLaMA-7B as the releases build it (transformers' LlamaConfig defaults, pad id 2).
LLAMA_7B_TEXT: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
}

TINY_TEXT: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
}

_TINY_VISION = VisionConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56
)
_TINY_ABSTRACTOR = AbstractorConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, encoder_hidden_size=32
)

PRESETS: dict[str, OwlConfig] = {
    # The embedded model (models/owl-tiny): the same architecture at about 4M parameters. 84-pixel
    # pictures in 7-pixel patches (a 12x12 grid): small shapes are about one and a half patches
    # across, and 145 tower positions instead of 257 at 112 pixels make a vision step about 0.48 s
    # instead of 0.76 s, which buys the recipe its steps (models/owl-tiny/README.md).
    "owl-tiny": OwlConfig(
        name="owl-tiny",
        layout="hub",
        vision=VisionConfig(
            hidden_size=160,
            intermediate_size=640,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=84,
            patch_size=7,
        ),
        abstractor=AbstractorConfig(
            hidden_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=432,
            encoder_hidden_size=160,
        ),
        text={
            **TINY_TEXT,
            "vocab_size": 1000,
            "hidden_size": 192,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 6,
            "max_position_embeddings": 512,
        },
        num_query_tokens=16,
    ),
    # HuggingFace release: MAGAer13/mplug-owl-llama-7b, -pt, -ft.
    "mplug-owl-llama-7b": OwlConfig(name="mplug-owl-llama-7b", layout="hub"),
    # First release: a single .pth (pretrained.pth / instruction_tuned.pth), 8 heads, bias_k/bias_v.
    "mplug-owl-7b-v0": OwlConfig(
        name="mplug-owl-7b-v0",
        layout="v0",
        vision=VisionConfig(num_attention_heads=8),
        abstractor=AbstractorConfig(num_attention_heads=8),
    ),
    # Tiny random models for tests: the same architecture at a few hundred thousand parameters.
    "tiny": OwlConfig(
        name="tiny",
        layout="hub",
        vision=_TINY_VISION,
        abstractor=_TINY_ABSTRACTOR,
        text=dict(TINY_TEXT),
        num_query_tokens=8,
    ),
    "tiny-v0": OwlConfig(
        name="tiny-v0",
        layout="v0",
        vision=dataclasses.replace(_TINY_VISION, num_attention_heads=2),
        abstractor=dataclasses.replace(_TINY_ABSTRACTOR, num_attention_heads=2),
        text=dict(TINY_TEXT),
        num_query_tokens=8,
    ),
}


def preset(name: str) -> OwlConfig:
    """A named preset; the error lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
