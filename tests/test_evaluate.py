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
