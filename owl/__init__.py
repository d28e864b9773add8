"""Owl: chat with the mPLUG-Owl family of multimodal models.

>>> import owl
>>> loaded = owl.load()  # the embedded model; or a .pth, a hub folder, a hub id
>>> chat = owl.Conversation().add_user("What colour is the circle?", images=["circle.png"])
>>> print(owl.answer(loaded, chat))
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from owl.config import DEMO_SYSTEM, PRESETS, OwlConfig, preset
from owl.conversation import Conversation, render_prompt
from owl.params import GenerationParams

if TYPE_CHECKING:
    import threading

    from owl.checkpoint import Loaded

__all__ = [
    "DEMO_SYSTEM",
    "PRESETS",
    "Conversation",
    "GenerationParams",
    "OwlConfig",
    "answer",
    "load",
    "preset",
    "render_prompt",
    "stream",
]


def load(checkpoint=None, **kwargs) -> Loaded:
    """Load a checkpoint with its tokenizer and image processor; see ``owl.checkpoint.load``."""
    from owl.checkpoint import load as _load

    return _load(checkpoint, **kwargs)


def stream(
    loaded: Loaded,
    conversation: Conversation,
    params: GenerationParams | None = None,
    *,
    cancel: threading.Event | None = None,
) -> Iterator[str]:
    """Stream the answer to a conversation whose last turn is the user's."""
    from owl.checkpoint import prepare
    from owl.generation import stream_generate

    ids, pixels = prepare(loaded, conversation)
    return stream_generate(
        loaded.model, loaded.tokenizer, ids, pixels, params or GenerationParams(), cancel=cancel
    )


def answer(loaded: Loaded, conversation: Conversation, params: GenerationParams | None = None) -> str:
    """The whole answer: the join of ``stream``."""
    return "".join(stream(loaded, conversation, params))
