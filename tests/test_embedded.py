"""The shipped tiny model through the serving engine: it looks at the picture, and answers fast."""

from __future__ import annotations

import time

import pytest

import owl
from owl.checkpoint import DEFAULT_CHECKPOINT
from owl.data.scenes import Scene, Shape, render
from owl.engine import Engine

pytestmark = pytest.mark.skipif(
    not (DEFAULT_CHECKPOINT / "config.json").is_file(), reason="no embedded model"
)
GREEDY = owl.GenerationParams(max_new_tokens=16)


@pytest.fixture(scope="module")
def engine():
    with Engine(owl.load()) as running:
        yield running


def picture(background: str, kind: str, colour: str, x: float = 0.4):
    scene = Scene(background, (Shape(kind, colour, "large", x, 0.5, 0.17),))
    return render(scene, width=240, height=180, antialias=True, noise=0.0, jpeg_quality=None)


def ask(engine, question: str, images) -> str:
    return engine.submit_conversation(owl.Conversation().add_user(question, images), GREEDY).text().strip()


def test_the_default_load_is_the_embedded_model():
    loaded = owl.load()
    assert loaded.name == "owl-tiny" and not loaded.random_weights
    assert loaded.model.num_parameters() < 6_000_000


@pytest.mark.parametrize("colour", ["red", "green", "blue", "yellow", "purple", "orange"])
def test_a_single_circle_is_called_by_its_colour(engine, colour):
    assert (
        ask(engine, "What colour is the circle?", [picture("white", "circle", colour)])
        == f"{colour.capitalize()}."
    )


@pytest.mark.parametrize("background", ["white", "black", "grey", "beige"])
def test_the_background_colour(engine, background):
    colour = "red" if background != "white" else "blue"
    image = picture(background, "square", colour)
    assert (
        ask(engine, "What is the background colour in the picture?", [image]) == f"{background.capitalize()}."
    )


def test_with_two_images_the_answer_follows_their_order(engine):
    """Asked about either picture, in either order: a model that always names one position, or
    that follows the order of the pictures but not the question, fails."""
    red = picture("white", "circle", "red")
    other = picture("black", "square", "yellow", x=0.6)
    answers = {
        (thing, order): ask(engine, f"Which image has {thing}?", images)
        for thing in ("a red circle", "a yellow square")
        for order, images in (("red first", [red, other]), ("red second", [other, red]))
    }
    assert answers == {
        ("a red circle", "red first"): "The first image.",
        ("a red circle", "red second"): "The second image.",
        ("a yellow square", "red first"): "The second image.",
        ("a yellow square", "red second"): "The first image.",
    }


def test_a_later_turn_about_the_first_image_still_uses_it(engine):
    """Image one, a question; image two, a question; then back to image one, in both colour orders
    (a model that answers about the newest image, or repeats an earlier answer, fails one)."""

    def back_to_the_first(first: str, second: str) -> str:
        conversation = (
            owl.Conversation()
            .add_user("What colour is the circle?", [picture("white", "circle", first)])
            .add_assistant(f"{first.capitalize()}.")
            .add_user("What colour is the circle in the second image?", [picture("white", "circle", second)])
            .add_assistant(f"{second.capitalize()}.")
            .add_user("What colour is the circle in the first image?")
        )
        return engine.submit_conversation(conversation, GREEDY).text().strip()

    assert [back_to_the_first("red", "blue"), back_to_the_first("blue", "red")] == ["Red.", "Blue."]


def test_a_short_answer_takes_under_a_second(engine):
    image = picture("white", "circle", "red")
    ask(engine, "What colour is the circle?", [image])  # warm
    started = time.monotonic()
    ask(engine, "What colour is the circle?", [image])
    assert time.monotonic() - started < 1.0
