"""Reading benchmark files: JSON lines or JSON arrays, every record with its line number.

Benchmark files come in both layouts (POPE's COCO files are JSON lines, its A-OKVQA/GQA files
indented arrays), and a bad record in a 3000-line file is only fixable if the error says where
it is, so every reader here reports ``file:line``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path


class DataError(ValueError):
    """A benchmark input file is malformed or does not match its counterpart."""


def data_path(*parts: str) -> Path:
    """A file shipped in ``vlsae_guard/scoring/data`` (works from a wheel as well as a checkout)."""
    return Path(str(resources.files("vlsae_guard.scoring").joinpath("data", *parts)))


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each JSON object in a JSON-lines or array file.

    Blank lines are skipped; anything else that is not a JSON object is a :class:`DataError`
    naming the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    if text.lstrip().startswith("["):
        yield from _array_records(path, text)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _array_records(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    """Decode a JSON array element by element, so each element keeps its starting line."""
    decoder = json.JSONDecoder()

    def line_of(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    def skip_space(offset: int) -> int:
        while offset < len(text) and text[offset] in " \t\r\n":
            offset += 1
        return offset

    pos = skip_space(text.index("[") + 1)
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                kind = type(record).__name__
                raise DataError(f"{path}:{line_of(pos)}: expected a JSON object, got {kind}")
            yield line_of(pos), record
            pos = skip_space(end)
            if text.startswith("]", pos):
                pos += 1
                break
            if not text.startswith(",", pos):
                raise DataError(f"{path}:{line_of(pos)}: expected ',' or ']' in the JSON array")
            pos = skip_space(pos + 1)
    rest = skip_space(pos)
    if rest < len(text):
        raise DataError(f"{path}:{line_of(rest)}: extra data after the JSON array")


def require(record: dict, key: str, types: type | tuple[type, ...], where: str):
    """``record[key]`` if present and of ``types``, else a :class:`DataError` at ``where``."""
    if key not in record:
        raise DataError(f"{where}: missing key {key!r}")
    value = record[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise DataError(f"{where}: {key!r} must be {names}, got {value!r}")
    return value


def format_ids(ids: list, limit: int = 10) -> str:
    """``1, 2, 3 ... (N more)``: enough to find the problem without flooding the terminal."""
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" ... ({len(ids) - limit} more)" if len(ids) > limit else "")
