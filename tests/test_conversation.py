"""Prompt strings equal the original demo's, character for character (spec A.4.3 / B.4.3)."""

from __future__ import annotations

import dataclasses

import pytest

from owl.config import DEMO_SYSTEM, IMAGE_TOKEN
from owl.conversation import Conversation, ImageSlot, prompt_segments, render_prompt

SYS = DEMO_SYSTEM


def test_demo_system_line_is_the_original():
    assert SYS == (
        "The following is a conversation between a curious human and AI. The AI gives helpful, "
        "detailed, and polite answers to the human's questions."
    )


@pytest.mark.parametrize(
    ("conversation", "expected"),
    [
        (
            Conversation().add_user("Explain why this meme is funny.", ["meme"]),
            f"{SYS}\nHuman: <image>\nHuman: Explain why this meme is funny.\nAI: ",
        ),
        (Conversation().add_user("Hello there"), f"{SYS}\nHuman: Hello there\nAI: "),
        (Conversation().add_user("", ["img"]), f"{SYS}\nHuman: <image>\nHuman: \nAI: "),
        (
            Conversation()
            .add_user("What is this?", ["a"])
            .add_assistant("A red box.")
            .add_user("And this one?", ["b"]),
            f"{SYS}\nHuman: <image>\nHuman: What is this?\nAI: A red box.\nHuman: <image>\nHuman: And this one?\nAI: ",
        ),
        (
            Conversation().add_user("Hi").add_assistant("Hello! How can I help?").add_user("Tell me more"),
            f"{SYS}\nHuman: Hi\nAI: Hello! How can I help?\nHuman: Tell me more\nAI: ",
        ),
        (
            Conversation().add_user("Which is bigger?", ["a", "b"]),
            f"{SYS}\nHuman: <image>\nHuman: <image>\nHuman: Which is bigger?\nAI: ",
        ),
    ],
    ids=[
        "one-image",
        "text-only",
        "image-empty-text",
        "image-each-turn",
        "two-text-turns",
        "two-images-one-turn",
    ],
)
def test_template_strings(conversation, expected):
    assert render_prompt(conversation) == expected


def test_configurable_system_line():
    conversation = Conversation(system="You are terse.").add_user("Hi")
    assert render_prompt(conversation) == "You are terse.\nHuman: Hi\nAI: "


def test_typed_image_tag_stays_text():
    conversation = Conversation().add_user(f"what does {IMAGE_TOKEN} mean?", ["real"])
    segments = prompt_segments(conversation)
    assert [s for s in segments if isinstance(s, ImageSlot)] == [ImageSlot(0)]
    assert segments[-1] == f"\nHuman: what does {IMAGE_TOKEN} mean?\nAI: "


def test_segments_number_images_across_turns():
    conversation = Conversation().add_user("q1", ["a", "b"]).add_assistant("x").add_user("q2", ["c"])
    assert [s.index for s in prompt_segments(conversation) if isinstance(s, ImageSlot)] == [0, 1, 2]
    assert conversation.images == ("a", "b", "c")


def test_conversation_is_immutable_and_undo_works():
    first = Conversation().add_user("Hi")
    second = first.add_assistant("Hello")
    assert first.turns != second.turns
    with pytest.raises(dataclasses.FrozenInstanceError):
        second.system = "x"
    assert second.without_last_exchange() == Conversation()


def test_turn_order_is_enforced():
    with pytest.raises(ValueError, match="assistant turn must follow a user turn"):
        Conversation().add_assistant("x")
    with pytest.raises(ValueError, match="two user turns in a row"):
        Conversation().add_user("a").add_user("b")
