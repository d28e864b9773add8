"""The synthetic world, its questions, the dataset writer and the tokenizer trainer (owl.data).

Answers are checked against small oracles written here from the scene data, not against the
generator's own helpers, so a wrong answer in the generator makes a test fail.
"""

from __future__ import annotations

import collections
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from owl.config import DEMO_SYSTEM, IMAGE_TOKEN
from owl.data import build, dialogues, scenes, tokenizer
from owl.data.dialogues import (
    Dialogue,
    Ref,
    Turn,
    answer_matches,
    normalize_answer,
    render_prompt,
    render_text,
)
from owl.data.scenes import COLOURS, SHAPE_KINDS, Scene, SceneError, Shape, random_scene, render

NUMBER = {"Zero.": 0, "One.": 1, "Two.": 2, "Three.": 3, "Four.": 4}
PLURAL = {"crosses": "cross", **{kind + "s": kind for kind in SHAPE_KINDS}}
SINGLE_REF = Ref("", "the image")


def _scene(*shapes: tuple[str, str, float, float], background: str = "white") -> Scene:
    """A hand-placed scene of small shapes: (kind, colour, x, y)."""
    return Scene(background, tuple(Shape(k, c, "small", x, y, 0.08) for k, c, x, y in shapes))


def _words(text: str, vocabulary: list[str]) -> list[str]:
    return [w for w in vocabulary if re.search(rf"\b{w}\b", text)]


def _kinds_in(question: str) -> list[str]:
    words = [PLURAL.get(w, w) for w in re.findall(r"[a-z]+", question.lower())]
    return [w for w in words if w in SHAPE_KINDS]


# --- scenes ---------------------------------------------------------------------------------------


def test_scenes_are_deterministic_per_seed() -> None:
    assert random_scene(random.Random(7)) == random_scene(random.Random(7))
    assert len({random_scene(random.Random(seed)) for seed in range(20)}) == 20


@pytest.mark.parametrize("size", [(96, 512), (512, 96), (300, 300), (40, 160)])
def test_shapes_stay_inside_and_apart_in_pixels(size: tuple[int, int]) -> None:
    """The fraction-space rules must hold in pixels at any aspect ratio."""
    width, height = size
    short = min(width, height)
    for seed in range(150):
        scene = random_scene(random.Random(seed))
        discs = [(s.x * width, s.y * height, s.radius * short) for s in scene.shapes]
        for x, y, r in discs:
            assert r <= x <= width - r and r <= y <= height - r
        for i, (x1, y1, r1) in enumerate(discs):
            for x2, y2, r2 in discs[i + 1 :]:
                assert math.hypot(x1 - x2, y1 - y2) > r1 + r2


def test_scene_rejects_overlap_and_invisible_colours() -> None:
    with pytest.raises(SceneError, match="overlap"):
        _scene(("circle", "red", 0.3, 0.3), ("star", "blue", 0.35, 0.4))
    with pytest.raises(SceneError, match="not visible"):
        _scene(("circle", "white", 0.3, 0.3), background="white")
    with pytest.raises(SceneError, match="outside"):
        _scene(("circle", "red", 0.02, 0.5))


def test_random_scene_honours_count_and_kinds() -> None:
    rng = random.Random(3)
    assert len(random_scene(rng, num_objects=4).shapes) == 4
    kinds = ["star", "star", "cross"]
    assert sorted(s.kind for s in random_scene(rng, kinds=kinds).shapes) == sorted(kinds)


def test_rendered_colours_are_where_the_scene_says() -> None:
    for seed in range(40):
        rng = random.Random(seed)
        scene = random_scene(rng)
        width, height = rng.randint(96, 512), rng.randint(96, 512)
        pixels = np.asarray(render(scene, width=width, height=height, antialias=seed % 2 == 0))
        assert pixels.shape == (height, width, 3)
        for shape in scene.shapes:
            centre = pixels[int(shape.y * height), int(shape.x * width)]
            assert np.abs(centre.astype(int) - COLOURS[shape.colour]).max() <= 2, (seed, shape)
        # No shape reaches a corner: its disc is inside the canvas.
        assert tuple(pixels[0, 0]) == scenes.BACKGROUNDS[scene.background]


def test_colours_survive_training_noise_and_jpeg() -> None:
    """After the strongest training augmentation the nearest palette colour is still the right one."""
    for seed in range(30):
        rng = random.Random(seed)
        scene = random_scene(rng)
        image = render(scene, width=128, height=96, noise=scenes.MAX_NOISE, jpeg_quality=40, rng=rng)
        pixels = np.asarray(image).astype(float)
        for shape in scene.shapes:
            x, y = int(shape.x * 128), int(shape.y * 96)
            patch = pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(axis=0)
            nearest = min(COLOURS, key=lambda name: float(np.linalg.norm(patch - COLOURS[name])))
            assert nearest == shape.colour, (seed, shape)


def test_noise_is_seeded_and_jpeg_changes_pixels() -> None:
    scene = random_scene(random.Random(0))
    noisy = [
        np.asarray(render(scene, width=100, height=80, noise=5.0, rng=random.Random(1))) for _ in range(2)
    ]
    clean = np.asarray(render(scene, width=100, height=80))
    compressed = np.asarray(render(scene, width=100, height=80, jpeg_quality=20))
    assert np.array_equal(noisy[0], noisy[1])
    assert not np.array_equal(noisy[0], clean)
    assert not np.array_equal(compressed, clean)
    with pytest.raises(ValueError, match="rng"):
        render(scene, width=100, height=80, noise=5.0)


def test_robustness_settings_are_never_training_settings() -> None:
    rng = random.Random(0)
    train = [scenes.training_settings(rng) for _ in range(300)]
    robust = [scenes.robustness_settings(rng) for _ in range(300)]
    for s in train:
        assert s.antialias and min(s.width, s.height) >= 96 and max(s.width, s.height) <= 512
        assert max(s.width, s.height) / min(s.width, s.height) <= 2.01
        assert s.jpeg_quality is None or s.jpeg_quality >= 40
    for s in robust:
        assert not s.antialias and s.jpeg_quality is not None and s.jpeg_quality <= 30
        outside_sizes = max(s.width, s.height) <= 80 or max(s.width, s.height) >= 640
        assert outside_sizes or max(s.width, s.height) / min(s.width, s.height) >= 2.4


def test_each_unseen_change_alone_keeps_the_rest_of_the_training_settings() -> None:
    """``change`` draws the very same questions with training settings but for one unseen change;
    the noise is the same pixel for pixel, so only that change differs from the clean picture."""
    clean = build.eval_items(10, seed=3)
    for change in scenes.UNSEEN_CHANGES:
        changed = build.eval_items(10, seed=3, change=change)
        assert [i.question for i in changed] == [i.question for i in clean]
        for item, plain in zip(changed, clean, strict=True):
            for s, p in zip(item.settings, plain.settings, strict=True):
                moved = {
                    f
                    for f in ("width", "height", "antialias", "jpeg_quality")
                    if getattr(s, f) != getattr(p, f)
                }
                long_side, short_side = max(s.width, s.height), min(s.width, s.height)
                if change == "hard edges":
                    assert moved == {"antialias"} and not s.antialias
                elif change == "low JPEG quality":
                    assert moved == {"jpeg_quality"} and s.jpeg_quality <= 30 and s.noise == p.noise
                elif change == "tiny canvas":
                    assert moved and moved <= {"width", "height"} and long_side <= 80
                elif change == "huge canvas":
                    assert moved and moved <= {"width", "height"} and long_side >= 640
                else:
                    assert moved and moved <= {"width", "height"} and long_side / short_side >= 2.4
    with pytest.raises(ValueError, match="unknown change 'fog'"):
        build.eval_items(2, seed=3, change="fog")
    with pytest.raises(ValueError, match="ask for one"):
        build.eval_items(2, seed=3, robust=True, change="hard edges")


# --- questions ------------------------------------------------------------------------------------


def _check_single(asked: dialogues.Asked, scene: Scene) -> None:
    """An oracle for the single-image kinds whose answers can be read off the scene directly."""
    q, a, shapes = asked.question, asked.answer, scene.shapes
    colours = _words(q, list(COLOURS))
    kinds = _kinds_in(q)
    if asked.kind == "count":
        assert NUMBER[a] == len(shapes)
    elif asked.kind == "count_colour":
        assert NUMBER[a] == sum(s.colour == colours[0] for s in shapes)
    elif asked.kind == "count_shape":
        assert NUMBER[a] == sum(s.kind == kinds[0] for s in shapes)
    elif asked.kind == "colour":
        (match,) = [s for s in shapes if s.kind == kinds[0]]  # asked only when unique
        assert a == f"{match.colour.capitalize()}."
    elif asked.kind == "shape":
        (match,) = [s for s in shapes if s.colour == colours[0]]
        assert a in (f"A {match.kind}.", f"An {match.kind}.")
    elif asked.kind == "exists":
        present = any(
            (not colours or s.colour == colours[0]) and (not kinds or s.kind == kinds[0]) for s in shapes
        )
        assert a == ("Yes." if present else "No.")
    elif asked.kind == "left_right":
        target = asked.focus
        assert target is not None and (target.x < 0.5) == (a == "On the left.")
        assert abs(target.x - 0.5) > 0.1
    elif asked.kind == "where":
        target = asked.focus
        assert target is not None
        down = "top" if target.y < 0.4 else "bottom" if target.y > 0.6 else "middle"
        across = "left" if target.x < 0.4 else "right" if target.x > 0.6 else ""
        expected = "centre" if down == "middle" and not across else f"{down} {across}".strip()
        assert a == f"At the {expected}."
    elif asked.kind == "describe":
        position = 0
        for shape in sorted(shapes, key=lambda s: s.x):  # named left to right
            position = a.index(f"{shape.colour} {shape.kind}", position) + 1
        assert a.endswith(f"{scene.background} background.")


def test_single_image_answers_agree_with_the_scene() -> None:
    seen = set()
    for seed in range(200):
        rng = random.Random(seed)
        scene = random_scene(rng)
        for kind, ask in dialogues.SINGLE_QUESTIONS.items():
            asked = ask(rng, scene, SINGLE_REF)
            if asked is not None:
                assert asked.kind == kind
                _check_single(asked, scene)
                seen.add(kind)
    assert seen == set(dialogues.SINGLE_QUESTIONS)


def test_questions_are_only_asked_when_well_posed() -> None:
    # Two stars, two reds, every object near the vertical centre line and the horizontal middle band.
    scene = _scene(("star", "red", 0.47, 0.2), ("star", "red", 0.53, 0.8))
    rng = random.Random(0)
    for _ in range(20):
        assert dialogues.ask_colour(rng, scene, SINGLE_REF) is None
        assert dialogues.ask_shape(rng, scene, SINGLE_REF) is None
        assert dialogues.ask_left_right(rng, scene, SINGLE_REF) is None
        assert dialogues.ask_size(rng, scene, SINGLE_REF) is None  # no phrase names one of them alone
    lone = _scene(("star", "red", 0.2, 0.5), ("circle", "red", 0.8, 0.5))
    asked = dialogues.ask_colour(random.Random(1), lone, SINGLE_REF)
    assert asked is not None and asked.answer == "Red."
    assert dialogues.where_answer(lone.shapes[0]) == "At the middle left."
    assert dialogues.where_answer(Shape("star", "red", "small", 0.5, 0.52, 0.08)) == "At the centre."
    assert dialogues.where_answer(Shape("star", "red", "small", 0.55, 0.2, 0.08)) == "At the top."
    assert dialogues.where_answer(Shape("star", "red", "small", 0.8, 0.9, 0.08)) == "At the bottom right."
    assert dialogues.where_answer(Shape("star", "red", "small", 0.42, 0.5, 0.08)) is None  # between bands


def test_relative_position_needs_a_clear_gap() -> None:
    close = _scene(("star", "red", 0.4, 0.3), ("circle", "blue", 0.55, 0.45))
    assert dialogues.ask_relative(random.Random(0), close, SINGLE_REF) is None
    far = _scene(("star", "red", 0.2, 0.5), ("circle", "blue", 0.8, 0.5))
    for seed in range(10):
        asked = dialogues.ask_relative(random.Random(seed), far, SINGLE_REF)
        assert asked is not None
        q = asked.question
        star_first = min(q.find(w) for w in ("star", "red") if w in q) < min(
            q.find(w) for w in ("circle", "blue") if w in q
        )
        assert asked.answer == ("To the left." if star_first else "To the right.")


def _holds(scene: Scene, thing: str) -> bool:
    colours, kinds = _words(thing, list(COLOURS)), _kinds_in(thing)
    return any(
        (not colours or s.colour == colours[0]) and (not kinds or s.kind == kinds[0]) for s in scene.shapes
    )


def test_two_image_answers_point_to_the_right_image() -> None:
    answers = set()
    for seed in range(150):
        rng = random.Random(seed)
        pair = (random_scene(rng), random_scene(rng))
        asked = dialogues.ask_which_image(rng, pair)
        if asked is not None:
            thing = re.sub(
                r"^(Which image has|In which image is there|Which of the two images shows|"
                r"Which picture contains) ",
                "",
                asked.question,
            ).rstrip("?")
            holders = [i for i, scene in enumerate(pair) if _holds(scene, thing)]
            assert len(holders) == 1
            assert asked.answer == ("The first image." if holders == [0] else "The second image.")
            answers.add(asked.answer)
        same = dialogues.ask_same_count(rng, pair)
        assert same is not None and (same.answer == "Yes.") == (len(pair[0].shapes) == len(pair[1].shapes))
        more = dialogues.ask_more_objects(rng, pair)
        if more is not None:
            winner = 0 if len(pair[0].shapes) > len(pair[1].shapes) else 1
            assert more.answer == ("The first image.", "The second image.")[winner]
    assert answers == {"The first image.", "The second image."}


def test_pair_scenes_balance_yes_and_no() -> None:
    rng = random.Random(0)
    for kind in ("same_count", "same_shapes"):
        answers = [dialogues.PAIR_QUESTIONS[kind](rng, dialogues.scene_pair(rng, kind)) for _ in range(200)]
        yes = sum(a is not None and a.answer == "Yes." for a in answers)
        assert 60 <= yes <= 140, (kind, yes)


def test_dialogues_are_consistent_and_varied() -> None:
    layouts = set()
    for seed in range(300):
        d = dialogues.random_dialogue(random.Random(seed))
        assert 1 <= len(d.turns) <= 3 and len(d.scenes) in (1, 2)
        assert d.turns[0].new_images >= 1
        assert len({t.question for t in d.turns}) == len(d.turns)
        layouts.add((len(d.scenes), len(d.turns), d.turns[0].new_images))
        if len(d.scenes) == 2:
            # With two images on screen, single-image questions say which image they mean.
            for turn in d.turns[1:]:
                if turn.kind in dialogues.SINGLE_QUESTIONS and turn.kind != "describe":
                    assert "first image" in turn.question or "second image" in turn.question, turn
    assert {(2, 2, 1), (2, 1, 2), (1, 1, 1), (1, 3, 1)} <= layouts
    assert dialogues.random_dialogue(random.Random(5)) == dialogues.random_dialogue(random.Random(5))


def test_each_turn_names_the_image_it_is_about() -> None:
    """A question naming an image is about it, "which image has X" about the one holding X, a
    pronoun follow-up about its object's image, and a comparison about none."""
    seen = collections.Counter()
    for seed in range(400):
        d = dialogues.random_dialogue(random.Random(seed), extra_turns=2)
        previous = None
        for turn in d.turns:
            if turn.kind == "which_image":
                assert turn.image == ("The first image.", "The second image.").index(turn.answer)
            elif turn.kind in ("more_objects", "same_count", "same_shapes"):
                assert turn.image is None
            elif turn.kind.startswith("followup_"):
                assert turn.image == previous.image
            elif len(d.scenes) == 1:
                assert turn.image == 0
            elif "first image" in turn.question or "second image" in turn.question:
                assert turn.image == (0 if "first image" in turn.question else 1), turn
            seen[turn.kind.split("_")[0], turn.image] += 1
            previous = turn
    assert seen["which", 0] and seen["which", 1] and seen["followup", 1] and seen["same", None]


def test_a_dialogue_about_drawn_scenes_shows_them_and_asks_about_them() -> None:
    """``dialogue_about`` builds a new conversation over given scenes, in the layouts of their
    number: one scene shown once (one or more questions), two compared or the second shown later;
    each single-image question is about a scene it shows, and the answers are those scenes'."""
    layouts = collections.Counter()
    for seed in range(200):
        first = dialogues.random_dialogue(random.Random(seed), extra_turns=2)
        d = dialogues.dialogue_about(random.Random(seed + 1000), first.scenes, extra_turns=2)
        assert d.scenes == first.scenes and d != first
        layouts[len(d.scenes), d.turns[0].new_images] += 1
        for turn in d.turns:
            if turn.kind == "count":
                assert (
                    turn.answer == f"{('One', 'Two', 'Three', 'Four')[len(d.scenes[turn.image].shapes) - 1]}."
                )
    assert layouts[1, 1] and layouts[2, 2] and layouts[2, 1]  # single, pair, later image
    assert set(layouts) == {(1, 1), (2, 2), (2, 1)}
    three = [scenes.random_scene(random.Random(i)) for i in range(3)]
    with pytest.raises(ValueError, match="one or two scenes, got 3"):
        dialogues.dialogue_about(random.Random(0), three)


def test_pair_turns_add_balanced_comparisons_after_the_same_beginning() -> None:
    """With ``pair_turns`` the extra turns of two-image conversations compare the images more often,
    only in ways whose answers stay balanced; what comes before the extra turns is unchanged."""
    plain, paired = collections.Counter(), collections.Counter()
    for seed in range(1000):
        base = dialogues.random_dialogue(random.Random(seed))
        d = dialogues.random_dialogue(random.Random(seed), extra_turns=2)
        p = dialogues.random_dialogue(random.Random(seed), extra_turns=2, pair_turns=1.0)
        assert p.turns[: len(base.turns)] == base.turns and p.scenes == base.scenes
        plain.update((t.kind, t.answer) for t in d.turns[len(base.turns) :])
        paired.update((t.kind, t.answer) for t in p.turns[len(base.turns) :])
    for kind in dialogues.BALANCED_PAIRS:
        first, second = paired[kind, "The first image."], paired[kind, "The second image."]
        assert first + second >= 3 * (plain[kind, "The first image."] + plain[kind, "The second image."])
        assert 0.4 < first / (first + second) < 0.6
    assert not any(kind in ("same_count", "same_shapes") for kind, _ in paired)


def test_question_weights_shift_the_training_mix() -> None:
    """Weights make a kind asked more or less often, single-image and pair kinds alike, in new
    conversations and in conversations about pictures drawn before."""
    weights = {"where": 4.0, "describe": 0.25, "same_shapes": 4.0}
    plain, weighted = collections.Counter(), collections.Counter()
    for seed in range(600):
        plain.update(t.kind for t in dialogues.random_dialogue(random.Random(seed), extra_turns=2).turns)
        w = dialogues.random_dialogue(random.Random(seed), extra_turns=2, weights=weights)
        weighted.update(t.kind for t in w.turns)
    assert weighted["where"] > 2 * plain["where"]
    assert weighted["same_shapes"] > 2 * plain["same_shapes"]
    assert weighted["describe"] < plain["describe"] / 2

    again, again_weighted = collections.Counter(), collections.Counter()
    for index in range(150):
        first = build.make_example(0, index)
        again.update(t.kind for t in build.reread_example(0, index, first, extra_turns=2).dialogue.turns)
        reread = build.reread_example(0, index, first, extra_turns=2, weights=weights)
        assert reread.images == first.images
        again_weighted.update(t.kind for t in reread.dialogue.turns)
    assert again_weighted["where"] > 2 * again["where"]


def test_repeats_draw_more_repeated_colours_and_kinds_and_leave_the_evaluation_alone() -> None:
    def repeated(scene: Scene, field: str) -> bool:
        values = [getattr(shape, field) for shape in scene.shapes]
        return len(set(values)) < len(values)

    plain = [random_scene(random.Random(seed), num_objects=3) for seed in range(400)]
    mixed = [random_scene(random.Random(seed), num_objects=3, repeats=0.4) for seed in range(400)]
    for field in ("colour", "kind"):
        assert sum(repeated(s, field) for s in mixed) > 1.5 * sum(repeated(s, field) for s in plain)
    assert all(
        scene == random_scene(random.Random(seed), num_objects=3, repeats=0.0)
        for seed, scene in enumerate(plain)
    )
    kinds = ["star", "cross", "circle"]  # given kinds stay as given; colours still repeat
    assert all(
        sorted(s.kind for s in random_scene(random.Random(i), kinds=kinds, repeats=1.0).shapes)
        == sorted(kinds)
        for i in range(20)
    )
    assert len({s.colour for s in random_scene(random.Random(0), kinds=kinds, repeats=1.0).shapes}) == 1
    with pytest.raises(SceneError, match="repeats must be 0 to 1, got 1.5"):
        random_scene(random.Random(0), repeats=1.5)

    counts = collections.Counter()
    for index in range(300):
        for r in (0.0, 0.3):
            turns = build.plan_example(0, index, extra_turns=2, repeats=r).dialogue.turns
            counts[r] += sum(
                t.kind in ("count_colour", "count_shape") and t.answer in ("Two.", "Three.") for t in turns
            )
    assert counts[0.3] > 1.5 * counts[0.0]
    assert build.plan_example(5, 7, repeats=0.0) == build.plan_example(5, 7)  # the evaluation's stream


# --- template -------------------------------------------------------------------------------------


def test_template_matches_the_original_format() -> None:
    one = _scene(("star", "red", 0.2, 0.5))
    single = Dialogue(
        (one,),
        (
            Turn("What colour is the star?", "Red.", "colour", 1),
            Turn("Where is it?", "On the left.", "followup_where"),
        ),
    )
    assert render_text(single, system="SYS") == (
        "SYS\nHuman: <image>\nHuman: What colour is the star?\nAI: Red.\nHuman: Where is it?\nAI: On the left."
    )
    pair = Dialogue(
        (one, one), (Turn("Which image has a blue circle?", "The second image.", "which_image", 2),)
    )
    assert render_text(pair, system="SYS") == (
        "SYS\nHuman: <image>\nHuman: <image>\nHuman: Which image has a blue circle?\nAI: The second image."
    )
    later = Dialogue((one, one), (Turn("Q1?", "A1.", "count", 1), Turn("Q2?", "A2.", "count", 1)))
    assert render_text(later, system="SYS") == (
        "SYS\nHuman: <image>\nHuman: Q1?\nAI: A1.\nHuman: <image>\nHuman: Q2?\nAI: A2."
    )
    assert render_prompt(later.turns[:1], "Q2?", new_images=1, system="SYS") + "A2." == render_text(
        later, system="SYS"
    )
    assert render_text(single).startswith(DEMO_SYSTEM + "\nHuman: ")
    with pytest.raises(ValueError, match="introduce 1 images"):
        Dialogue((one, one), (Turn("Q?", "A.", "count", 1),))


def test_answer_matching() -> None:
    assert answer_matches("red", "Red.")
    assert answer_matches("  RED. ", "Red.")
    assert answer_matches("3", "Three.")
    assert answer_matches("circle", "A circle.")
    assert answer_matches("the  second image", "The second image.")
    assert not answer_matches("red and blue", "Red.")
    assert not answer_matches("Red.", "Red and blue.")
    assert not answer_matches("The first image.", "The second image.")
    assert not answer_matches("", "No.")
    assert normalize_answer("On the Left!") == "on the left"


# --- dataset --------------------------------------------------------------------------------------


def test_written_jsonl_has_the_original_format(tmp_path: Path) -> None:
    jsonl = build.write_dataset(tmp_path, 8, seed=3)
    lines = jsonl.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 8
    for index, line in enumerate(lines):
        record = json.loads(line)
        assert set(record) == {"image", "text", "task_type"}
        assert record["task_type"].rsplit("_", 1)[-1] == "sft"
        assert record["text"].startswith(DEMO_SYSTEM + "\nHuman: ")
        assert record["text"].count(IMAGE_TOKEN) == len(record["image"]) >= 1
        example = build.make_example(3, index)
        assert record["text"] == example.text
        for path, image in zip(record["image"], example.images, strict=True):
            assert not Path(path).is_absolute() and path.endswith((".png", ".jpg"))
            # The file holds exactly the pixels the in-memory path produces.
            assert np.array_equal(
                np.asarray(scenes.decode((tmp_path / path).read_bytes())), np.asarray(image)
            )
    assert build.write_dataset(tmp_path / "again", 8, seed=3).read_bytes() == jsonl.read_bytes()
    assert build.write_dataset(tmp_path / "other", 8, seed=4).read_bytes() != jsonl.read_bytes()


def test_examples_are_pure_functions_of_seed_and_index() -> None:
    a, b = build.make_example(1, 5), build.make_example(1, 5)
    assert a.text == b.text and a.settings == b.settings
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images, strict=True))
    assert build.make_example(1, 5, split="eval").dialogue != a.dialogue
    assert [e.text for e in build.iter_examples(1, start=4, num=2)] == [
        build.make_example(1, i).text for i in (4, 5)
    ]


def test_eval_items_replay_the_conversation() -> None:
    items = build.eval_items(12, seed=0)
    robust = build.eval_items(12, seed=0, robust=True)
    assert len(items) == 12
    for item, hard in zip(items, robust, strict=True):
        assert len(item.images) == sum(t.new_images for t in (*item.history, item.turn)) == len(item.settings)
        assert item.prompt().endswith("\nAI: ")
        assert item.prompt().count(IMAGE_TOKEN) == len(item.images)
        # Same conversation, different pixels.
        assert (hard.question, hard.answer, hard.kind) == (item.question, item.answer, item.kind)
        assert all(not s.antialias for s in hard.settings)
    with_history = [item for item in items if item.history]
    assert with_history, "the first dialogues of seed 0 include a multi-turn one"
    item = with_history[0]
    assert item.history[-1].answer in item.prompt()


# --- tokenizer ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [render_text(dialogues.random_dialogue(random.Random(seed))) for seed in range(300)]


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    return tokenizer.train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tokenizer.model", 600)


def test_tokenizer_has_llama_special_ids_and_byte_fallback(tokenizer_model: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    assert sp.get_piece_size() == 600
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    text = f"{DEMO_SYSTEM}\nHuman: Is the star on the left?\nAI: Yes.  Café ☕ 42"
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    pieces = sp.encode("☕", out_type=str)
    assert pieces[-3:] == ["<0xE2>", "<0x98>", "<0x95>"]  # never seen in training: UTF-8 bytes
    assert sp.encode("\n", out_type=str)[-1] == "<0x0A>"  # newline as a byte, like LLaMA
    assert sp.encode("2048", out_type=str) == ["▁", "2", "0", "4", "8"]  # digits split, like LLaMA
    for raw in ("ﬁ ＡＢ", "Human:  two  spaces ", " leading"):
        assert sp.decode(sp.encode(raw)) == raw  # identity normalisation, whitespace kept
    assert "▁colour" in sp.encode("colour", out_type=str)  # domain words are whole pieces


def test_tokenizer_splits_digits_even_when_numbers_repeat(tmp_path: Path, corpus: list[str]) -> None:
    texts = [*corpus, *["Human: 2048 or 2048?"] * 200]
    sp = spm.SentencePieceProcessor(
        model_file=str(tokenizer.train_tokenizer(texts, tmp_path / "d.model", 600))
    )
    assert sp.encode("2048", out_type=str) == ["▁", "2", "0", "4", "8"]


def test_tokenizer_training_is_deterministic(
    tmp_path: Path, corpus: list[str], tokenizer_model: Path
) -> None:
    again = tokenizer.train_tokenizer(corpus, tmp_path / "again.model", 600)
    assert again.read_bytes() == tokenizer_model.read_bytes()
    other = tokenizer.train_tokenizer(corpus[:100], tmp_path / "other.model", 600)
    assert other.read_bytes() != tokenizer_model.read_bytes()


def test_tokenizer_errors_say_what_to_pass(tmp_path: Path, corpus: list[str]) -> None:
    with pytest.raises(tokenizer.TokenizerError, match=r"--vocab-size \d+ or less"):
        tokenizer.train_tokenizer(corpus[:5], tmp_path / "t.model", 5000)
    with pytest.raises(tokenizer.TokenizerError, match="byte fallback"):
        tokenizer.train_tokenizer(corpus, tmp_path / "t.model", 200)


def test_tokenizer_cli_reads_jsonl(tmp_path: Path) -> None:
    jsonl = build.write_dataset(tmp_path / "data", 40, seed=0)
    out = tmp_path / "tokenizer.model"
    tokenizer.main(["--data", str(jsonl), "--out", str(out), "--vocab-size", "400"])
    assert spm.SentencePieceProcessor(model_file=str(out)).get_piece_size() == 400
