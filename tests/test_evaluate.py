"""The evaluation command, on the embedded model."""

from __future__ import annotations

import json

import pytest

from owl import evaluate
from owl.data.scenes import UNSEEN_CHANGES


def test_by_change_asks_the_same_questions_clean_and_with_each_unseen_change(tmp_path, capsys):
    out = tmp_path / "changes.json"
    assert evaluate.main(["--num", "12", "--seed", "5", "--by-change", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[1]
    assert all(name in header for name in ("clean", *UNSEEN_CHANGES))
    assert table.splitlines()[-1].startswith("all")
    numbers = json.loads(out.read_text())["by_change"]
    assert list(numbers) == ["clean", *UNSEEN_CHANGES]
    for summary in numbers.values():
        assert sum(total for _, total in summary["per_kind"].values()) == 12
    # "clean" is the plain evaluation of the same questions.
    plain = tmp_path / "plain.json"
    evaluate.main(["--num", "12", "--seed", "5", "--json", str(plain)])
    assert json.loads(plain.read_text())["per_kind"] == numbers["clean"]["per_kind"]


def test_by_change_and_robust_are_not_asked_together(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--num", "4", "--robust", "--by-change"])
    assert "leave out --robust" in capsys.readouterr().err


def test_by_answer_breaks_each_kind_down_by_its_gold_answers(tmp_path, capsys):
    """Each gold answer's row counts the questions that had it, and its wrong answers are what the
    model said on them; the rows of a kind add up to the kind's line."""
    out = tmp_path / "answers.json"
    assert evaluate.main(["--num", "60", "--seed", "5", "--by-answer", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    numbers = json.loads(out.read_text())
    rows = numbers["per_answer"]
    assert sum(row["total"] for row in rows) == 60
    for kind, (right, total) in numbers["per_kind"].items():
        mine = [row for row in rows if row["kind"] == kind]
        assert sum(row["right"] for row in mine) == right and sum(row["total"] for row in mine) == total
    for row in rows:
        assert sum(count for _, count in row["instead"]) == row["total"] - row["right"]
        assert all(answer != row["answer"] for answer, _ in row["instead"])
        if row["kind"] != "describe":
            assert any(
                line.split()[:1] == [row["kind"]] and row["answer"] in line for line in printed.splitlines()
            )
    assert any(row["instead"] for row in rows)  # at 60 questions the embedded model gets some wrong


def test_by_answer_and_by_change_are_not_asked_together(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--num", "4", "--by-answer", "--by-change"])
    assert "leave out --by-change" in capsys.readouterr().err


def test_by_turn_scores_each_answer_by_its_place_in_longer_conversations(tmp_path, capsys):
    """Conversations two questions longer than the evaluation's own (three to five answers, as
    training draws them), every answer counted once at its place, empty answers counted apart."""
    out = tmp_path / "turns.json"
    assert evaluate.main(["--num", "30", "--seed", "5", "--by-turn", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    numbers = json.loads(out.read_text())
    places = numbers["per_turn"]
    assert {"1", "2", "3"} <= set(places) and numbers["extra_turns"] == 2
    assert sum(p["total"] for p in places.values()) == 30
    assert sum(p["right"] for p in places.values()) == sum(right for right, _ in numbers["per_kind"].values())
    assert places["1"]["total"] >= places["3"]["total"] > 0  # every conversation has a third answer
    assert all(p["empty"] <= p["total"] - p["right"] for p in places.values())
    rows = {line.split()[0]: line.split()[1:] for line in printed.split("\n\n")[-1].splitlines()[1:]}
    assert rows["first"][:2] == [str(places["1"]["right"]), str(places["1"]["total"])]
    assert rows["third"][:2] == [str(places["3"]["right"]), str(places["3"]["total"])]


def test_by_turn_and_by_change_are_not_asked_together(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--num", "4", "--by-turn", "--by-change"])
    assert "leave out --by-change" in capsys.readouterr().err


def test_answers_get_room_for_the_longest_gold_answer_and_its_end():
    """A fixed cap cut long answers short and scored them wrong: the budget follows the answers."""
    from owl.checkpoint import DEFAULT_CHECKPOINT
    from owl.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_CHECKPOINT)  # the embedded model's, without its weights
    short = "Yes."
    long = ", ".join(["a red circle, a blue square and a green triangle on a white background"] * 3) + "."
    assert len(tokenizer.encode(long)) > 40
    budget = evaluate.answer_budget([short, long, "Two."], tokenizer)
    assert budget > len(tokenizer.encode(long))  # the whole answer and its end-of-sequence
    assert evaluate.answer_budget([short], tokenizer) < budget
    assert evaluate.answer_budget([], tokenizer) == evaluate.ANSWER_SLACK
