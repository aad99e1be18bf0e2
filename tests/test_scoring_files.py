"""Benchmark file reading: both layouts, and errors that say file:line."""

import pytest

from vlsae_guard.scoring.files import DataError, read_records


def test_json_lines_with_line_numbers(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(read_records(path)) == [(1, {"a": 1}), (3, {"a": 2})]


def test_json_array_elements_keep_their_lines(tmp_path):
    path = tmp_path / "q.json"
    path.write_text('[\n  {"a": 1},\n  {\n    "a": 2\n  }\n]\n')
    assert list(read_records(path)) == [(2, {"a": 1}), (3, {"a": 2})]
    (tmp_path / "empty.json").write_text(" [ ] ")
    assert list(read_records(tmp_path / "empty.json")) == []


@pytest.mark.parametrize(
    "text, line",
    [
        ('{"a": 1}\n{"a": 2,}\n', 2),  # JSON lines: bad line
        ('{"a": 1}\n[1, 2]\n', 2),  # JSON lines: not an object
        ('[\n {"a": 1},\n {"a": }\n]', 3),  # array: bad element
        ('[\n {"a": 1}\n {"a": 2}\n]', 3),  # array: missing comma
        ('[\n {"a": 1},\n 7\n]', 3),  # array: not an object
        ('[\n {"a": 1}\n]\nextra', 4),  # array: trailing garbage
    ],
)
def test_malformed_input_names_file_and_line(tmp_path, text, line):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"bad\.json:{line}: "):
        list(read_records(path))
