"""Append-only answer files that a killed run resumes without losing or repeating anything.

Each answer is one JSON line, written and flushed as soon as its batch is done. On restart the
file is read back: a last line cut off mid-write (no newline, not valid JSON) is dropped, and
only the ids without an answer are generated. A sidecar ``.settings.json`` records what the
answers depend on (model and SAE hashes, guard settings, prompt, decoding), so answers made
with other settings are never mixed in silently.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from ..outputs import write_text
from ..scoring.files import DataError


class AnswerLog:
    """The answers of one arm on one split, keyed by ``str(record[key])``."""

    def __init__(self, path: str | os.PathLike, key: str, settings: dict):
        self.path = Path(path)
        self.key = key
        self.settings_path = self.path.with_name(self.path.stem + ".settings.json")
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        self.records: dict[str, dict] = {}
        self._check_settings()
        self._read()

    def _check_settings(self) -> None:
        if self.settings_path.exists():
            recorded = json.loads(self.settings_path.read_text())
            if recorded != self.settings:
                changed = sorted(
                    k
                    for k in set(recorded) | set(self.settings)
                    if recorded.get(k) != self.settings.get(k)
                )
                raise DataError(
                    f"{self.path} holds answers made with other settings ({', '.join(changed)} "
                    "differ); use another --out directory or delete these files"
                )
        elif self.path.exists() and self.path.stat().st_size:
            raise DataError(
                f"{self.path} exists without {self.settings_path.name}: cannot tell how its "
                "answers were made; use another --out directory or delete it"
            )

    def _read(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # after the last newline: b"" if the file ends cleanly
        seen: dict[str, int] = {}  # key -> line of its first answer
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{self.path}:{number}: not valid JSON ({e.msg})") from e
            self._add(record, number, seen)
        if tail.strip():
            try:  # a complete last record that only lacks its newline is kept
                record = json.loads(tail)
            except json.JSONDecodeError:  # cut off mid-write by a kill: drop it
                with open(self.path, "r+b") as f:
                    f.truncate(len(data) - len(tail))
            else:
                self._add(record, len(lines) + 1, seen)
                with open(self.path, "ab") as f:
                    f.write(b"\n")

    def _add(self, record: object, number: int, seen: dict[str, int]) -> None:
        """Keep one answer per key: an identical repeat (a retried write) is collapsed with a
        warning; a different answer to the same key is refused, as ``score`` refuses it."""
        if not isinstance(record, dict) or self.key not in record:
            raise DataError(f"{self.path}:{number}: not an answer record (no {self.key!r})")
        key = str(record[self.key])
        if key in self.records:
            first = seen[key]
            if record != self.records[key]:
                raise DataError(
                    f"{self.path}:{number}: {self.key} {key} was already answered differently on "
                    f"line {first} ({self.path}:{first}); remove one of the two lines or use "
                    "another --out directory"
                )
            warnings.warn(
                f"{self.path}:{number}: repeats the answer of line {first} for {self.key} {key} "
                "word for word; counted once",
                stacklevel=2,
            )
            return
        seen[key] = number
        self.records[key] = record

    def done(self, key) -> bool:
        return str(key) in self.records

    def append(self, records: Iterable[dict]) -> None:
        """Write records durably (flushed and synced) before the next batch starts."""
        if not self.settings_path.exists():
            write_text(self.settings_path, json.dumps(self.settings, indent=2, sort_keys=True))
        lines = []
        for record in records:
            self.records[str(record[self.key])] = record
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
