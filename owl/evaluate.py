"""Exact-answer accuracy on freshly drawn synthetic scenes, per question kind.

    python -m owl.evaluate --num 2000 --seed 1234            # the embedded model
    python -m owl.evaluate --num 2000 --seed 1234 --robust   # scenes drawn in ways training never saw

Questions come from the evaluation split (scenes never used in training) and are answered
greedily through the serving engine; earlier turns of a conversation carry their gold answers.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from owl.params import GenerationParams

TWO_IMAGE_KINDS = ("which_image", "more_objects", "same_count", "same_shapes")


@dataclass
class Report:
    per_kind: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind -> (right, total)
    seconds: float = 0.0
    mistakes: list[dict] = field(default_factory=list)

    def accuracy(self, kinds: Sequence[str] | None = None) -> float:
        chosen = [v for k, v in self.per_kind.items() if kinds is None or k in kinds]
        total = sum(t for _, t in chosen)
        return sum(r for r, _ in chosen) / total if total else 0.0

    @property
    def single_kinds(self) -> list[str]:
        return sorted(k for k in self.per_kind if k not in TWO_IMAGE_KINDS)

    def table(self) -> str:
        lines = [f"{'question kind':<16} {'right':>6} {'total':>6} {'accuracy':>9}"]
        for kind in [*self.single_kinds, *[k for k in TWO_IMAGE_KINDS if k in self.per_kind]]:
            right, total = self.per_kind[kind]
            lines.append(f"{kind:<16} {right:>6} {total:>6} {right / total:>9.1%}")
        two = [k for k in TWO_IMAGE_KINDS if k in self.per_kind]
        lines.append(f"{'single-image':<16} {'':>6} {'':>6} {self.accuracy(self.single_kinds):>9.1%}")
        lines.append(f"{'two-image':<16} {'':>6} {'':>6} {self.accuracy(two):>9.1%}")
        lines.append(f"{'all':<16} {'':>6} {'':>6} {self.accuracy():>9.1%}")
        return "\n".join(lines)


def evaluate(loaded, *, num: int, seed: int, robust: bool = False, max_batch: int = 16) -> Report:
    from owl.data.build import eval_items
    from owl.data.dialogues import answer_matches
    from owl.engine import Engine, EngineSettings
    from owl.processing import encode_prompt

    items = eval_items(num, seed=seed, robust=robust)
    params = GenerationParams(max_new_tokens=24)
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    report = Report()
    started = time.monotonic()
    with Engine(loaded, EngineSettings(max_batch=max_batch, queue_size=len(items) + 1)) as engine:
        handles = []
        for item in items:
            ids = encode_prompt(
                item.prompt(), loaded.tokenizer, loaded.config.num_image_tokens, len(item.images)
            )
            handles.append(engine.submit(ids, loaded.processor(list(item.images)), params))
        for item, handle in zip(items, handles, strict=True):
            answer = handle.text().strip()
            right = answer_matches(answer, item.answer)
            counts[item.kind][0] += right
            counts[item.kind][1] += 1
            if not right and len(report.mistakes) < 50:
                report.mistakes.append(
                    {"kind": item.kind, "question": item.question, "gold": item.answer, "answer": answer}
                )
    report.seconds = time.monotonic() - started
    report.per_kind = {k: (v[0], v[1]) for k, v in sorted(counts.items())}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    import owl

    parser = argparse.ArgumentParser(prog="python -m owl.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="default: the embedded model")
    parser.add_argument("--num", type=int, default=2000, help="questions to ask")
    parser.add_argument("--seed", type=int, default=1234, help="evaluation seed (never used in training)")
    parser.add_argument("--robust", action="store_true", help="draw scenes in settings training never used")
    parser.add_argument("--mistakes", action="store_true", help="print some wrong answers")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    loaded = owl.load(args.checkpoint)
    report = evaluate(loaded, num=args.num, seed=args.seed, robust=args.robust)
    print(
        f"{loaded.name}: {args.num} questions, seed {args.seed}{', robustness scenes' if args.robust else ''}, "
        f"{report.seconds:.0f} s"
    )
    print(report.table())
    if args.mistakes:
        for mistake in report.mistakes[:20]:
            print(json.dumps(mistake), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "per_kind": report.per_kind,
                    "single_image": report.accuracy(report.single_kinds),
                    "two_image": report.accuracy([k for k in TWO_IMAGE_KINDS if k in report.per_kind]),
                    "all": report.accuracy(),
                    "robust": args.robust,
                    "seed": args.seed,
                    "num": args.num,
                },
                handle,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
