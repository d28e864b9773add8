"""What reading each drawn picture in several conversations (``--reuse``) saves per training step.

    python bench/train_reuse.py [--steps 90] [--reuse 1 2 3]

Trains the tiny recipe's second stage (tower frozen, every probe on) from the shipped embedded
model for a few steps and for ``--steps`` more, once per ``--reuse`` value, and takes the
difference, so loading, the last evaluation and saving cancel out. Prints seconds per step, the
steps that fit in the language stage's 21 minutes, how often a picture was drawn and encoded per
conversation, and each value's speed against reuse 1, all measured in this run on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the table, not six progress bars (read when tqdm loads)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from owl.train import TINY_RECIPE, FrozenTowerCache, TrainSettings, train

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "owl-tiny"
LEAD = 10  # steps of the shorter run: what the longer one does besides its extra steps


def timed_run(settings: TrainSettings, **steps: int) -> tuple[float, FrozenTowerCache | None]:
    """Seconds for a run with these settings' step counts (``steps=``, ``vision_steps=``), and the
    tower cache it used (if any)."""
    caches = []
    install = FrozenTowerCache.__init__

    def remember(self, *args, **kwargs):
        install(self, *args, **kwargs)
        caches.append(self)

    FrozenTowerCache.__init__ = remember
    try:
        with tempfile.TemporaryDirectory() as out:
            started = time.monotonic()
            train(dataclasses.replace(settings, out=Path(out), **steps))
            return time.monotonic() - started, (caches[0] if caches else None)
    finally:
        FrozenTowerCache.__init__ = install


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=90, help="steps timed per value")
    parser.add_argument("--reuse", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    if args.steps < 30:
        parser.error("--steps must be at least 30: over fewer the difference is mostly noise")
    logging.basicConfig(level=logging.WARNING)
    recipe = {**TINY_RECIPE, "vision_steps": 0, "easy_steps": 0, "max_minutes": None}
    recipe |= {"eval_every": 10**6, "save_every": 10**6, "init": str(SHIPPED)}
    rows = []
    for reuse in args.reuse:
        settings = TrainSettings(out=Path("."), **{**recipe, "reuse": reuse})
        short, _ = timed_run(settings, steps=LEAD)
        long, cache = timed_run(settings, steps=LEAD + args.steps)
        per_step = (long - short) / args.steps
        encoded = cache.misses / (cache.misses + cache.hits) if cache else 1.0
        rows.append((reuse, per_step, encoded))
        print(f"reuse {reuse}: {per_step:.3f} s a step", file=sys.stderr, flush=True)
    base = rows[0][1]
    print(f"{'reuse':>5}  {'s/step':>7}  {'steps in 21 min':>15}  {'pictures encoded':>16}  {'speed':>6}")
    for reuse, per_step, encoded in rows:
        steps = 21 * 60 / per_step
        print(f"{reuse:>5}  {per_step:>7.3f}  {steps:>15.0f}  {encoded:>15.0%}  {base / per_step:>5.2f}x")
    print(f"threads {torch.get_num_threads()}, baseline reuse {rows[0][0]}, {args.steps} steps per value")


if __name__ == "__main__":
    main()
