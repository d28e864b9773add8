"""Exact-answer accuracy on freshly drawn synthetic scenes, per question kind.

    python -m owl.evaluate --num 2000 --seed 1234            # the embedded model
    python -m owl.evaluate --num 2000 --seed 1234 --robust   # scenes drawn in ways training never saw
    python -m owl.evaluate --num 500 --by-change             # which unseen way of drawing costs what
    python -m owl.evaluate --num 2000 --by-turn              # first answers of a chat against later ones

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

# New tokens an answer may run past the longest gold answer of its evaluation: an answer that long
# is wrong whatever follows, and no answer as long as the longest gold one is ever cut short.
ANSWER_SLACK = 8


def answer_budget(answers: Sequence[str], tokenizer) -> int:
    """New tokens to generate in an evaluation of these gold ``answers``: the longest of them in
    ``tokenizer``'s pieces, and :data:`ANSWER_SLACK` more (its end-of-sequence among them)."""
    return max((len(tokenizer.encode(answer)) for answer in answers), default=0) + ANSWER_SLACK


TWO_IMAGE_KINDS = ("which_image", "more_objects", "same_count", "same_shapes")


@dataclass
class Report:
    per_kind: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind -> (right, total)
    seconds: float = 0.0
    mistakes: list[dict] = field(default_factory=list)
    # (kind, gold answer) -> (right, total, the wrong answers given, most frequent first)
    per_answer: dict[tuple[str, str], tuple[int, int, list[tuple[str, int]]]] = field(default_factory=dict)
    # the answer's place in its conversation (1: the first) -> (right, total, empty answers)
    per_turn: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    def accuracy(self, kinds: Sequence[str] | None = None) -> float:
        chosen = [v for k, v in self.per_kind.items() if kinds is None or k in kinds]
        total = sum(t for _, t in chosen)
        return sum(r for r, _ in chosen) / total if total else 0.0

    @property
    def single_kinds(self) -> list[str]:
        return sorted(k for k in self.per_kind if k not in TWO_IMAGE_KINDS)

    @property
    def two_kinds(self) -> list[str]:
        return [k for k in TWO_IMAGE_KINDS if k in self.per_kind]

    def table(self) -> str:
        lines = [f"{'question kind':<16} {'right':>6} {'total':>6} {'accuracy':>9}"]
        for kind in [*self.single_kinds, *self.two_kinds]:
            right, total = self.per_kind[kind]
            lines.append(f"{kind:<16} {right:>6} {total:>6} {right / total:>9.1%}")
        lines.append(f"{'single-image':<16} {'':>6} {'':>6} {self.accuracy(self.single_kinds):>9.1%}")
        lines.append(f"{'two-image':<16} {'':>6} {'':>6} {self.accuracy(self.two_kinds):>9.1%}")
        lines.append(f"{'all':<16} {'':>6} {'':>6} {self.accuracy():>9.1%}")
        return "\n".join(lines)

    def answer_table(self, max_answers: int = 12) -> str:
        """Per question kind, each gold answer: how often it was given, and what was said instead.

        A form can score well overall and never give one of its answers (a class the model has not
        learnt to tell apart); this shows it. A kind with more than ``max_answers`` different gold
        answers (descriptions) gets one line."""
        head = f"{'question kind':<16} {'gold answer':<22} {'right':>6} {'total':>6} {'accuracy':>9}  said instead"
        lines = [head]
        for kind in [*self.single_kinds, *self.two_kinds]:
            rows = {gold: tally for (k, gold), tally in self.per_answer.items() if k == kind}
            if len(rows) > max_answers:
                right, total = self.per_kind[kind]
                lines.append(
                    f"{kind:<16} {f'({len(rows)} different)':<22} {right:>6} {total:>6} {right / total:>9.1%}"
                )
                continue
            for gold, (right, total, instead) in sorted(rows.items()):
                said = ", ".join(f"{answer} ({count})" for answer, count in instead[:2])
                lines.append(
                    f"{kind:<16} {gold:<22} {right:>6} {total:>6} {right / total:>9.1%}  {said}".rstrip()
                )
        return "\n".join(lines)

    def turn_table(self) -> str:
        """Accuracy by the answer's place in its conversation. A chat asks for each answer after
        ``AI: `` and its trailing space, while inside a training conversation an answer follows
        ``AI:``: only a conversation's last answer is trained as asked, and a model can learn the
        later places and not the first (or answer it with nothing)."""
        lines = [f"{'answer':<16} {'right':>6} {'total':>6} {'accuracy':>9} {'empty':>6}"]
        for place, (right, total, empty) in sorted(self.per_turn.items()):
            lines.append(f"{_ordinal(place):<16} {right:>6} {total:>6} {right / total:>9.1%} {empty:>6}")
        return "\n".join(lines)

    def summary(self) -> dict:
        """The numbers of :meth:`table`, for a JSON file."""
        return {
            "per_kind": self.per_kind,
            "single_image": self.accuracy(self.single_kinds),
            "two_image": self.accuracy(self.two_kinds),
            "all": self.accuracy(),
        }


def _ordinal(place: int) -> str:
    return {1: "first", 2: "second", 3: "third"}.get(place, f"{place}th")


def change_table(reports: dict[str, Report]) -> str:
    """Accuracy per question kind (rows) for each way of drawing (columns), from :func:`by_change`."""
    names = list(reports)
    kinds = sorted({kind for report in reports.values() for kind in report.per_kind})
    singles = [k for k in kinds if k not in TWO_IMAGE_KINDS]
    rows = [(k, [k]) for k in singles + [k for k in TWO_IMAGE_KINDS if k in kinds]]
    rows += [("single-image", singles), ("two-image", list(TWO_IMAGE_KINDS)), ("all", None)]
    width = max(12, *(len(name) + 1 for name in names))
    lines = [f"{'question kind':<16}" + "".join(f"{name:>{width}}" for name in names)]
    for label, chosen in rows:
        cells = []
        for name in names:
            report = reports[name]
            present = chosen is None or any(k in report.per_kind for k in chosen)
            cells.append(f"{report.accuracy(chosen):>{width}.1%}" if present else f"{'-':>{width}}")
        lines.append(f"{label:<16}" + "".join(cells))
    return "\n".join(lines)


def evaluate(
    loaded,
    *,
    num: int,
    seed: int,
    robust: bool = False,
    change: str | None = None,
    extra_turns: int = 0,
    max_batch: int = 16,
) -> Report:
    """Asks ``num`` held-out questions (drawn as :func:`owl.data.build.eval_items` draws them)."""
    from owl.data.build import eval_items
    from owl.data.dialogues import answer_matches
    from owl.engine import Engine, EngineSettings
    from owl.processing import encode_prompt

    items = eval_items(num, seed=seed, robust=robust, change=change, extra_turns=extra_turns)
    params = GenerationParams(max_new_tokens=answer_budget([item.answer for item in items], loaded.tokenizer))
    # (kind, gold answer) -> [right, total, the wrong answers given]
    tallies: dict[tuple[str, str], list] = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    places: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0, 0])  # right, total, empty
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
            tally = tallies[item.kind, item.answer]
            tally[0] += right
            tally[1] += 1
            place = places[len(item.history) + 1]
            place[0] += right
            place[1] += 1
            place[2] += not answer
            if not right:
                tally[2][answer] += 1
                if len(report.mistakes) < 50:
                    report.mistakes.append(
                        {"kind": item.kind, "question": item.question, "gold": item.answer, "answer": answer}
                    )
    report.seconds = time.monotonic() - started
    report.per_answer = {
        key: (r, t, instead.most_common()) for key, (r, t, instead) in sorted(tallies.items())
    }
    per_kind: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for (kind, _), (right, total, _) in report.per_answer.items():
        per_kind[kind][0] += right
        per_kind[kind][1] += total
    report.per_kind = {kind: (right, total) for kind, (right, total) in per_kind.items()}
    report.per_turn = {place: tuple(counts) for place, counts in sorted(places.items())}
    return report


def by_change(loaded, *, num: int, seed: int) -> dict[str, Report]:
    """The same ``num`` questions drawn as in training ("clean") and then with each one of
    :data:`owl.data.scenes.UNSEEN_CHANGES` alone: which unseen way of drawing costs what."""
    from owl.data.scenes import UNSEEN_CHANGES

    reports = {"clean": evaluate(loaded, num=num, seed=seed)}
    for change in UNSEEN_CHANGES:
        reports[change] = evaluate(loaded, num=num, seed=seed, change=change)
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    import owl

    parser = argparse.ArgumentParser(prog="python -m owl.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="default: the embedded model")
    parser.add_argument("--num", type=int, default=2000, help="questions to ask")
    parser.add_argument("--seed", type=int, default=1234, help="evaluation seed (never used in training)")
    parser.add_argument("--robust", action="store_true", help="draw scenes in settings training never used")
    parser.add_argument(
        "--by-change",
        action="store_true",
        help="the questions clean, then with each unseen way of drawing alone, side by side",
    )
    parser.add_argument(
        "--by-answer",
        action="store_true",
        help="also each gold answer of each question kind, with what was said instead when wrong",
    )
    parser.add_argument(
        "--by-turn",
        action="store_true",
        help="conversations two questions longer (as training draws them), scored by each answer's place",
    )
    parser.add_argument("--mistakes", action="store_true", help="print some wrong answers")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.robust and args.by_change:
        parser.error("--by-change draws each unseen change alone; leave out --robust")
    if args.by_answer and args.by_change:
        parser.error("--by-answer breaks one evaluation down; leave out --by-change")
    if args.by_turn and args.by_change:
        parser.error("--by-turn breaks one evaluation down; leave out --by-change")
    loaded = owl.load(args.checkpoint)
    if args.by_change:
        reports = by_change(loaded, num=args.num, seed=args.seed)
        seconds = sum(report.seconds for report in reports.values())
        print(f"{loaded.name}: {args.num} questions per way of drawing, seed {args.seed}, {seconds:.0f} s")
        print(change_table(reports))
        if args.json:
            with open(args.json, "w") as handle:
                summary = {name: report.summary() for name, report in reports.items()}
                json.dump({"by_change": summary, "seed": args.seed, "num": args.num}, handle, indent=2)
        return 0
    extra_turns = 2 if args.by_turn else 0
    report = evaluate(loaded, num=args.num, seed=args.seed, robust=args.robust, extra_turns=extra_turns)
    print(
        f"{loaded.name}: {args.num} questions, seed {args.seed}{', robustness scenes' if args.robust else ''}"
        f"{', conversations two questions longer' if args.by_turn else ''}, {report.seconds:.0f} s"
    )
    print(report.table())
    if args.by_turn:
        print()
        print(report.turn_table())
    if args.by_answer:
        print()
        print(report.answer_table())
    if args.mistakes:
        for mistake in report.mistakes[:20]:
            print(json.dumps(mistake), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as handle:
            summary = report.summary()
            if args.by_answer:
                summary["per_answer"] = [
                    {"kind": kind, "answer": gold, "right": right, "total": total, "instead": instead}
                    for (kind, gold), (right, total, instead) in report.per_answer.items()
                ]
            if args.by_turn:
                summary["per_turn"] = {
                    place: {"right": right, "total": total, "empty": empty}
                    for place, (right, total, empty) in report.per_turn.items()
                }
            json.dump(
                {
                    **summary,
                    "robust": args.robust,
                    "seed": args.seed,
                    "num": args.num,
                    "extra_turns": extra_turns,
                },
                handle,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
