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
from collections.abc import Iterable
from pathlib import Path

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
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{self.path}:{number}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or self.key not in record:
                raise DataError(f"{self.path}:{number}: not an answer record (no {self.key!r})")
            self.records[str(record[self.key])] = record
        if tail.strip():
            try:  # a complete last record that only lacks its newline is kept
                record = json.loads(tail)
                self.records[str(record[self.key])] = record
                with open(self.path, "ab") as f:
                    f.write(b"\n")
            except json.JSONDecodeError:  # cut off mid-write by a kill: drop it
                with open(self.path, "r+b") as f:
                    f.truncate(len(data) - len(tail))

    def done(self, key) -> bool:
        return str(key) in self.records

    def append(self, records: Iterable[dict]) -> None:
        """Write records durably (flushed and synced) before the next batch starts."""
        if not self.settings_path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.settings_path.write_text(json.dumps(self.settings, indent=2, sort_keys=True))
        lines = []
        for record in records:
            self.records[str(record[self.key])] = record
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
