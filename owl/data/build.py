"""Synthetic training and evaluation data: in memory for on-the-fly training, or written as jsonl.

Every example is a pure function of ``(split, seed, index)``: its random stream is seeded with the
string ``"owl-data:{split}:{seed}:{index}"``. So a dataset is deterministic for a seed, any example can
be regenerated alone (a map-style dataset can call :func:`make_example` in ``__getitem__``), workers
may run in any order, and the ``"train"`` and ``"eval"`` splits never share a scene for the same seed.

The written format is the original mPLUG-Owl jsonl (spec B.6), one object per line::

    {"image": ["images/00000042_0.png"], "text": "SYS\\nHuman: <image>\\nHuman: ...\\nAI: ...",
     "task_type": "synthetic_sft"}

Image paths are **relative to the directory that holds data.jsonl** (``--out DIR``), so a dataset can
be moved as one folder; a loader joins them onto ``Path(jsonl).parent``. Images rendered with JPEG
compression are stored as those very JPEG bytes (``.jpg``), the others as PNG, so reading a file back
gives exactly the image :func:`make_example` returns in memory.

CLI: ``python -m owl.data.build --out DIR --num N --seed S [--workers K] [--split eval] [--robust]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import multiprocessing
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from owl.config import DEMO_SYSTEM
from owl.data.dialogues import Dialogue, Turn, dialogue_about, random_dialogue, render_prompt, render_text
from owl.data.scenes import (
    RenderSettings,
    encode_jpeg,
    encode_png,
    one_unseen_change,
    render_with,
    robustness_settings,
    training_settings,
)

logger = logging.getLogger(__name__)

# The last "_"-separated word selects the image processor in the original pipeline ("sft").
TASK_TYPE = "synthetic_sft"
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Plan:
    """Everything that decides an example, before any pixel is drawn."""

    dialogue: Dialogue
    settings: tuple[RenderSettings, ...]
    # One seed string per image for its pixel noise, so images can be drawn in any order.
    noise_seeds: tuple[str, ...]


@dataclass(frozen=True)
class Example:
    """A training example: the conversation, its images (RGB) and its training text."""

    dialogue: Dialogue
    settings: tuple[RenderSettings, ...]
    images: tuple[Image.Image, ...]
    text: str


def plan_example(
    seed: int,
    index: int,
    *,
    split: str = "train",
    robust: bool = False,
    change: str | None = None,
    extra_turns: int = 0,
    pair_turns: float = 0.0,
    weights: Mapping[str, float] | None = None,
    repeats: float = 0.0,
) -> Plan:
    """The dialogue and render settings of example ``index``.

    The dialogue is drawn before the render settings, so ``robust=True`` gives the very same
    conversation drawn with unseen settings: clean and robust scores compare like for like.
    ``change`` (one of :data:`owl.data.scenes.UNSEEN_CHANGES`) keeps the training settings but for
    that one change, to tell which unseen way of drawing costs what. ``weights`` and ``repeats``:
    a training mix of question kinds and of scenes (:func:`~owl.data.dialogues.random_dialogue`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if robust and change is not None:
        raise ValueError("robust and change are two kinds of unseen settings: ask for one")
    key = f"owl-data:{split}:{seed}:{index}"
    rng = random.Random(key)
    dialogue = random_dialogue(
        rng, extra_turns=extra_turns, pair_turns=pair_turns, weights=weights, repeats=repeats
    )
    pick = robustness_settings if robust else training_settings
    settings = tuple(pick(rng) for _ in dialogue.scenes)
    if change is not None:
        settings = tuple(
            one_unseen_change(s, change, random.Random(f"{key}:{change}:{j}")) for j, s in enumerate(settings)
        )
    return Plan(dialogue, settings, tuple(f"{key}:image{j}" for j in range(len(settings))))


def make_example(
    seed: int,
    index: int,
    *,
    split: str = "train",
    robust: bool = False,
    change: str | None = None,
    system: str = DEMO_SYSTEM,
    extra_turns: int = 0,
    pair_turns: float = 0.0,
    weights: Mapping[str, float] | None = None,
    repeats: float = 0.0,
) -> Example:
    """Example ``index`` in memory, images as PIL (JPEG artefacts included where its settings ask)."""
    plan = plan_example(
        seed,
        index,
        split=split,
        robust=robust,
        change=change,
        extra_turns=extra_turns,
        pair_turns=pair_turns,
        weights=weights,
        repeats=repeats,
    )
    images = tuple(
        render_with(scene, settings, random.Random(noise_seed))
        for scene, settings, noise_seed in zip(
            plan.dialogue.scenes, plan.settings, plan.noise_seeds, strict=True
        )
    )
    return Example(plan.dialogue, plan.settings, images, render_text(plan.dialogue, system=system))


def reread_example(
    seed: int,
    index: int,
    first: Example,
    *,
    system: str = DEMO_SYSTEM,
    extra_turns: int = 0,
    pair_turns: float = 0.0,
    weights: Mapping[str, float] | None = None,
) -> Example:
    """Example ``index`` of a training stream that reads pictures more than once: a new conversation
    (:func:`~owl.data.dialogues.dialogue_about`) about the very pictures of ``first`` (its scenes,
    settings and pixels), so a picture drawn once is asked about again. Its random stream is seeded
    with ``"owl-data:again:{seed}:{index}"``, apart from both splits."""
    rng = random.Random(f"owl-data:again:{seed}:{index}")
    dialogue = dialogue_about(
        rng, first.dialogue.scenes, extra_turns=extra_turns, pair_turns=pair_turns, weights=weights
    )
    return Example(dialogue, first.settings, first.images, render_text(dialogue, system=system))


def iter_examples(
    seed: int, *, start: int = 0, num: int | None = None, split: str = "train", robust: bool = False
) -> Iterator[Example]:
    """Examples ``start, start+1, ...``; endless when ``num`` is None (on-the-fly training)."""
    index = start
    while num is None or index < start + num:
        yield make_example(seed, index, split=split, robust=robust)
        index += 1


# --- evaluation items -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalItem:
    """One question to score, with the conversation before it answered by the gold answers.

    ``images`` holds every image shown up to and including this question, in order; the last
    ``turn.new_images`` of them arrive with the question itself. ``settings`` says how each was drawn,
    so robustness scores can be broken down by resolution, aspect or JPEG quality.
    """

    images: tuple[Image.Image, ...]
    settings: tuple[RenderSettings, ...]
    history: tuple[Turn, ...]
    turn: Turn

    @property
    def question(self) -> str:
        return self.turn.question

    @property
    def answer(self) -> str:
        return self.turn.answer

    @property
    def kind(self) -> str:
        return self.turn.kind

    def prompt(self, *, system: str = DEMO_SYSTEM) -> str:
        """The template text ending in ``AI: `` that the model continues."""
        return render_prompt(self.history, self.turn.question, new_images=self.turn.new_images, system=system)


def eval_items(
    num: int, *, seed: int = 0, robust: bool = False, change: str | None = None, extra_turns: int = 0
) -> list[EvalItem]:
    """``num`` evaluation items from the ``"eval"`` split: one per turn of successive dialogues.

    With ``robust=True`` the same questions come with images drawn in settings never used in training
    (see :func:`owl.data.scenes.robustness_settings`); with ``change`` in training settings but for
    one unseen change (:func:`owl.data.scenes.one_unseen_change`); with ``extra_turns``, dialogues
    that many questions longer, as training draws them.
    """
    items: list[EvalItem] = []
    index = 0
    while len(items) < num:
        example = make_example(
            seed, index, split="eval", robust=robust, change=change, extra_turns=extra_turns
        )
        items += _turn_items(example)
        index += 1
    return items[:num]


def _turn_items(example: Example) -> list[EvalItem]:
    items = []
    shown = 0
    turns = example.dialogue.turns
    for i, turn in enumerate(turns):
        shown += turn.new_images
        items.append(EvalItem(example.images[:shown], example.settings[:shown], turns[:i], turn))
    return items


# --- writing a dataset ----------------------------------------------------------------------------


def _write_record(index: int, *, seed: int, out_dir: Path, split: str, robust: bool) -> str:
    """Render example ``index`` to files under ``out_dir/images`` and return its jsonl line."""
    plan = plan_example(seed, index, split=split, robust=robust)
    paths = []
    for j, (scene, settings, noise_seed) in enumerate(
        zip(plan.dialogue.scenes, plan.settings, plan.noise_seeds, strict=True)
    ):
        # The same pixels as make_example: render without JPEG, then store the JPEG bytes themselves.
        lossless = dataclasses.replace(settings, jpeg_quality=None)
        image = render_with(scene, lossless, random.Random(noise_seed))
        if settings.jpeg_quality is None:
            data, suffix = encode_png(image), "png"
        else:
            data, suffix = encode_jpeg(image, settings.jpeg_quality), "jpg"
        relative = f"images/{index:08d}_{j}.{suffix}"
        (out_dir / relative).write_bytes(data)
        paths.append(relative)
    record = {"image": paths, "text": render_text(plan.dialogue), "task_type": TASK_TYPE}
    return json.dumps(record, ensure_ascii=False)


def write_dataset(
    out_dir: str | Path,
    num: int,
    *,
    seed: int = 0,
    workers: int = 1,
    split: str = "train",
    robust: bool = False,
) -> Path:
    """Write ``num`` examples as ``out_dir/data.jsonl`` plus ``out_dir/images/``; returns the jsonl path.

    The output does not depend on ``workers``. Workers are spawned, not forked, so calling this from a
    process that already runs torch threads is safe.
    """
    if num < 0 or workers < 1:
        raise ValueError(f"num must be >= 0 and workers >= 1, got num={num}, workers={workers}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    task = functools.partial(_write_record, seed=seed, out_dir=out_dir, split=split, robust=robust)
    jsonl = out_dir / "data.jsonl"
    logger.info(
        "writing %d %s examples (seed %d) to %s with %d worker(s)", num, split, seed, out_dir, workers
    )
    partial = jsonl.with_suffix(".jsonl.partial")
    with partial.open("w", encoding="utf-8") as handle:
        for line in _map_in_order(task, range(num), workers):
            handle.write(line + "\n")
    partial.replace(jsonl)  # a reader never sees a half-written file
    return jsonl


def _map_in_order(task: functools.partial[str], indices: Sequence[int], workers: int) -> Iterator[str]:
    if workers == 1:
        yield from map(task, indices)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(task, indices, chunksize=32)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m owl.data.build",
        description="Write a synthetic mPLUG-Owl dataset: DIR/data.jsonl (original format) and DIR/images/.",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder; image paths are relative to it"
    )
    parser.add_argument("--num", type=int, required=True, help="number of examples (conversations)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes rendering images")
    parser.add_argument(
        "--split", choices=SPLITS, default="train", help="'eval' draws from a disjoint stream"
    )
    parser.add_argument("--robust", action="store_true", help="render with settings never used in training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    jsonl = write_dataset(
        args.out, args.num, seed=args.seed, workers=args.workers, split=args.split, robust=args.robust
    )
    print(f"wrote {args.num} examples to {jsonl} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()


EASY_KINDS = ("colour", "shape", "describe", "background", "count", "exists")


def easy_example(seed: int, index: int, *, system: str = DEMO_SYSTEM) -> Example:
    """A first-lessons example: one picture of one or two objects and 3-4 plain questions about it.

    Early in training the answers barely depend on the picture, so the language model learns to
    ignore it; pictures this simple make looking pay off from the first steps (a curriculum).
    """
    from owl.data.dialogues import SINGLE_QUESTIONS, Dialogue, Turn, single_ref
    from owl.data.scenes import random_scene

    rng = random.Random(f"owl-data:easy:{seed}:{index}")
    scene = random_scene(rng, num_objects=rng.choice((1, 1, 2)))
    turns: list[Turn] = []
    for kind in rng.sample(EASY_KINDS, k=len(EASY_KINDS)):
        asked = SINGLE_QUESTIONS[kind](rng, scene, single_ref(rng))
        if asked is not None and all(t.question != asked.question for t in turns):
            turns.append(Turn(asked.question, asked.answer, asked.kind, 1 if not turns else 0, 0))
        if len(turns) == 4:
            break
    dialogue = Dialogue((scene,), tuple(turns))
    settings = training_settings(rng)
    image = render_with(scene, settings, random.Random(f"owl-data:easy:{seed}:{index}:image0"))
    return Example(dialogue, (settings,), (image,), render_text(dialogue, system=system))
