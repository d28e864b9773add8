"""Conversations as pure, immutable data, rendered into the mPLUG-Owl template.

Template (``SYS`` is the system line)::

    SYS\\nHuman: <image>\\nHuman: What is this?\\nAI: A red box.\\nHuman: And this?\\nAI:␣

Each image of a user turn gets its own ``Human: <image>`` line before that turn's text; the prompt
ends with ``AI: `` (with a trailing space, shown as ␣ above). ``render_prompt`` gives that string; ``prompt_segments``
gives the same text split into text chunks and image slots, which is what gets tokenised, so a
user who types the literal text ``<image>`` gets text, not a placeholder.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from owl.config import DEMO_SYSTEM, IMAGE_TOKEN

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class ImageSlot:
    """Where one image goes in a prompt; ``index`` counts images from the start of the conversation."""

    index: int


Segment = str | ImageSlot


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str
    # Anything the caller uses to find the image again (a path, a PIL image, bytes, an id).
    images: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Conversation:
    system: str = DEMO_SYSTEM
    turns: tuple[Turn, ...] = field(default_factory=tuple)

    def add_user(self, text: str, images: tuple[Any, ...] | list[Any] = ()) -> Conversation:
        if self.turns and self.turns[-1].role == "user":
            raise ValueError("two user turns in a row: add the assistant's answer first")
        return replace(self, turns=(*self.turns, Turn("user", text, tuple(images))))

    def add_assistant(self, text: str) -> Conversation:
        if not self.turns or self.turns[-1].role != "user":
            raise ValueError("an assistant turn must follow a user turn")
        return replace(self, turns=(*self.turns, Turn("assistant", text)))

    def without_last_exchange(self) -> Conversation:
        """Drop the last user turn and the answer after it (Undo)."""
        turns = list(self.turns)
        if turns and turns[-1].role == "assistant":
            turns.pop()
        if turns and turns[-1].role == "user":
            turns.pop()
        return replace(self, turns=tuple(turns))

    @property
    def images(self) -> tuple[Any, ...]:
        """Every image of the conversation, in prompt order."""
        return tuple(image for turn in self.turns for image in turn.images)

    @property
    def awaiting_answer(self) -> bool:
        return bool(self.turns) and self.turns[-1].role == "user"

    def to_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "turns": [{"role": t.role, "text": t.text, "images": len(t.images)} for t in self.turns],
        }


def prompt_segments(conversation: Conversation) -> tuple[Segment, ...]:
    """The prompt as text chunks and image slots, adjacent text merged into one chunk."""
    segments: list[Segment] = []
    text = [conversation.system]
    image_index = 0

    def flush() -> None:
        if text:
            segments.append("".join(text))
            text.clear()

    for turn in conversation.turns:
        if turn.role == "user":
            for _ in turn.images:
                text.append("\nHuman: ")
                flush()
                segments.append(ImageSlot(image_index))
                image_index += 1
            text.append(f"\nHuman: {turn.text}")
        else:
            text.append(f"\nAI: {turn.text}")
    if conversation.awaiting_answer:
        text.append("\nAI: ")
    flush()
    return tuple(segment for segment in segments if segment != "")


def render_prompt(conversation: Conversation) -> str:
    """The prompt string, with ``<image>`` where each image goes."""
    return "".join(IMAGE_TOKEN if isinstance(s, ImageSlot) else s for s in prompt_segments(conversation))
