"""What writing attention out (``owl.model.attend``) saves per training step of the tiny recipe.

    python bench/train_attention.py [--steps 60] [--rounds 3]

Times each stage of the recipe with attention written out as two matmuls and a float32 softmax
where a backward pass follows (what training on a CPU does), and with torch's fused
``scaled_dot_product_attention`` everywhere (what it did before). The vision stage trains from
scratch, the language stage from the shipped embedded model with every probe on; each is run for
a few steps and for ``--steps`` more, and the difference taken, so that loading, evaluation and
saving cancel out.

A machine's speed drifts over minutes (by a fifth, on a shared 2-core machine), so the variants
are not timed one after the other: each round times both, one right after the other, in the
opposite order to the round before, and the speed-up is taken within each round. Prints seconds
per step and the speed-up of each stage (the median of the rounds, and their range).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
from pathlib import Path
from unittest import mock

os.environ.setdefault("TQDM_DISABLE", "1")  # the table, not a wall of progress bars (read when tqdm loads)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.train_reuse import LEAD, SHIPPED, timed_run
from owl.train import TINY_RECIPE, TrainSettings

COMMON = {"eval_every": 10**6, "save_every": 10**6, "max_minutes": None, "easy_steps": 0}
STAGES = {  # stage: (settings, the field that counts its steps)
    "vision": ({**TINY_RECIPE, **COMMON, "steps": 1}, "vision_steps"),
    "language": ({**TINY_RECIPE, **COMMON, "vision_steps": 0, "init": str(SHIPPED)}, "steps"),
}


def per_step(settings: TrainSettings, field: str, steps: int, fused: bool) -> float:
    """Seconds a step of one stage takes: the difference of a ``LEAD + steps`` and a ``LEAD``
    step run; ``fused``: SDPA everywhere."""
    with mock.patch("owl.train.write_out_attention") if fused else contextlib.nullcontext():
        short = timed_run(settings, **{field: LEAD})[0]
        long = timed_run(settings, **{field: LEAD + steps})[0]
    return (long - short) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps timed per stage, variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each timing both variants")
    args = parser.parse_args()
    if args.steps < 30:
        parser.error("--steps must be at least 30: over fewer the difference is mostly noise")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    stages = {
        stage: (TrainSettings(out=Path("."), **recipe), field) for stage, (recipe, field) in STAGES.items()
    }
    timings = {stage: {True: [], False: []} for stage in STAGES}  # stage: {fused: [s/step per round]}
    for round_ in range(args.rounds):
        order = (True, False) if round_ % 2 == 0 else (False, True)
        for stage, (settings, field) in stages.items():
            for fused in order:
                seconds = per_step(settings, field, args.steps, fused)
                timings[stage][fused].append(seconds)
                label = "fused SDPA" if fused else "written out"
                print(
                    f"round {round_ + 1}, {stage} stage, {label}: {seconds:.3f} s a step",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"{'stage':>8}  {'fused s/step':>12}  {'written out s/step':>18}  {'speed':>6}  {'rounds range':>13}"
    )
    for stage, by_variant in timings.items():
        fused, written = by_variant[True], by_variant[False]
        ratios = [f / w for f, w in zip(fused, written, strict=True)]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}x"
        print(
            f"{stage:>8}  {statistics.median(fused):>12.3f}  {statistics.median(written):>18.3f}"
            f"  {statistics.median(ratios):>5.2f}x  {spread:>13}"
        )
    print(
        f"threads {torch.get_num_threads()}, {args.rounds} rounds of {args.steps} steps per stage and variant,"
        " medians; baseline fused SDPA"
    )


if __name__ == "__main__":
    main()
