"""Answer files: appended as produced, resumed after a kill, never mixed across settings."""

import json

import pytest

from vlsae_guard.harness.answers import AnswerLog
from vlsae_guard.scoring.files import DataError

SETTINGS = {"model_sha256": "abc", "prompt": "{question}"}


def records(ids):
    return [{"question_id": i, "text": f"answer {i}"} for i in ids]


def test_appended_answers_are_read_back(tmp_path):
    log = AnswerLog(tmp_path / "a.jsonl", "question_id", SETTINGS)
    log.append(records([1, 2]))
    log.append(records([3]))
    again = AnswerLog(tmp_path / "a.jsonl", "question_id", SETTINGS)
    assert sorted(again.records) == ["1", "2", "3"] and again.done(2) and not again.done(4)


def test_a_line_cut_off_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "a.jsonl"
    AnswerLog(path, "question_id", SETTINGS).append(records([1, 2, 3]))
    with open(path, "a") as f:
        f.write('{"question_id": 4, "te')  # killed mid-write
    log = AnswerLog(path, "question_id", SETTINGS)
    assert sorted(log.records) == ["1", "2", "3"]
    log.append(records([4]))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question_id"] for r in lines] == [1, 2, 3, 4]


def test_a_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "a.jsonl"
    AnswerLog(path, "question_id", SETTINGS).append(records([1]))
    with open(path, "a") as f:
        f.write(json.dumps(records([2])[0]))
    log = AnswerLog(path, "question_id", SETTINGS)
    log.append(records([3]))
    assert [json.loads(x)["question_id"] for x in path.read_text().splitlines()] == [1, 2, 3]


def test_other_settings_are_refused(tmp_path):
    AnswerLog(tmp_path / "a.jsonl", "question_id", SETTINGS).append(records([1]))
    with pytest.raises(DataError, match=r"other settings \(model_sha256 differ\)"):
        AnswerLog(tmp_path / "a.jsonl", "question_id", {**SETTINGS, "model_sha256": "def"})
    (tmp_path / "b.jsonl").write_text(json.dumps(records([1])[0]) + "\n")
    with pytest.raises(DataError, match="without b.settings.json"):
        AnswerLog(tmp_path / "b.jsonl", "question_id", SETTINGS)


def test_a_corrupt_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "a.jsonl"
    AnswerLog(path, "question_id", SETTINGS).append(records([1]))
    with open(path, "a") as f:
        f.write("garbage\n" + json.dumps(records([2])[0]) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:2: not valid JSON"):
        AnswerLog(path, "question_id", SETTINGS)
