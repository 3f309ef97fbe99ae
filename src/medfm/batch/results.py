"""``results.jsonl``: one row a case, appended line by line (flush + fsync), so a crash loses at
most the case in flight and never leaves half a line behind that is read as a result."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medfm.io.writers import atomic_path


class ResultsLog:
    """The batch's results file: the last row of each case id, and appending new ones."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        #: a case got a newer row this run (a redone case): `compact` at the end keeps one a case
        self.superseded = False
        if path.is_file():
            self._load()

    def _load(self) -> None:
        lines = self.path.read_text().split("\n")
        complete, broken, total = 0, False, 0
        for text in lines:
            if not text.strip():
                continue
            total += 1
            try:
                row = json.loads(text)
                self.rows[row["id"]] = row
                complete += 1
            except (json.JSONDecodeError, KeyError, TypeError):
                broken = True  # a line cut by a crash: the case is simply redone
        if broken or complete != len(self.rows) or (lines and lines[-1] != ""):
            self.compact()

    def append(self, row: dict[str, Any]) -> None:
        """Add one case's row durably before the next case is reported."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.superseded |= row["id"] in self.rows
        self.rows[row["id"]] = row

    def compact(self) -> None:
        """Rewrite the file atomically with one row a case (its last one)."""
        with atomic_path(self.path) as temporary:
            temporary.write_text("".join(json.dumps(row) + "\n" for row in self.rows.values()))
        self.superseded = False
