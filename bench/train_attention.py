"""What writing attention out (``owl.model.attend``) saves per training step of the tiny recipe.

    python bench/train_attention.py [--steps 60]

Times each stage of the recipe twice in this run, alternately: with attention written out as two
matmuls and a float32 softmax where a backward pass follows (what training on a CPU does), and
with torch's fused ``scaled_dot_product_attention`` everywhere (what it did before). The vision
stage trains from scratch, the language stage from the shipped embedded model with every probe
on; each is run for a few steps and for ``--steps`` more, and the difference taken, so that
loading, evaluation and saving cancel out. Prints seconds per step and the speed-up of each
stage, measured on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from unittest import mock

os.environ.setdefault("TQDM_DISABLE", "1")  # the table, not eight progress bars (read when tqdm loads)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.train_reuse import LEAD, SHIPPED, timed_run
from owl.train import TINY_RECIPE, TrainSettings

COMMON = {"eval_every": 10**6, "save_every": 10**6, "max_minutes": None, "easy_steps": 0}
STAGES = {  # stage: (settings, the field that counts its steps)
    "vision": ({**TINY_RECIPE, **COMMON, "steps": 1}, "vision_steps"),
    "language": ({**TINY_RECIPE, **COMMON, "vision_steps": 0, "init": str(SHIPPED)}, "steps"),
}


def seconds(settings: TrainSettings, field: str, steps: int, fused: bool) -> float:
    """Wall time of a run with ``steps`` steps of one stage; ``fused``: SDPA everywhere."""
    with mock.patch("owl.train.write_out_attention") if fused else contextlib.nullcontext():
        return timed_run(settings, **{field: steps})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps timed per stage and variant")
    args = parser.parse_args()
    if args.steps < 30:
        parser.error("--steps must be at least 30: over fewer the difference is mostly noise")
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for stage, (recipe, field) in STAGES.items():
        settings = TrainSettings(out=Path("."), **recipe)
        per_step = {}
        for fused in (True, False):
            short = seconds(settings, field, LEAD, fused)
            long = seconds(settings, field, LEAD + args.steps, fused)
            per_step[fused] = (long - short) / args.steps
            label = "fused SDPA" if fused else "written out"
            print(f"{stage} stage, {label}: {per_step[fused]:.3f} s a step", file=sys.stderr, flush=True)
        rows.append((stage, per_step[True], per_step[False]))
    print(f"{'stage':>8}  {'fused s/step':>12}  {'written out s/step':>18}  {'speed':>6}")
    for stage, fused, written in rows:
        print(f"{stage:>8}  {fused:>12.3f}  {written:>18.3f}  {fused / written:>5.2f}x")
    print(f"threads {torch.get_num_threads()}, {args.steps} steps per stage and variant, baseline fused SDPA")


if __name__ == "__main__":
    main()
