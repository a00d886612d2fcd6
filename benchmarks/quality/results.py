"""The quality benchmark's results: RULER's score of one answer, and the resumable JSONL file
(one flushed line per result; a torn last line from a kill is skipped)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def score(output: str, answers: Iterable[str]) -> float:
    """RULER string_match_all for one sample: the fraction of answers in the output (0..1)."""
    answers = list(answers)
    text = output.lower()
    return sum(a.lower() in text for a in answers) / len(answers) if answers else 0.0



def row_key(row: dict[str, Any]) -> tuple:
    return (row["model"], row["id"], row["policy"], row["budget"])


def read_results(path: Path) -> list[dict[str, Any]]:
    """Every complete row; a torn last line (from a kill mid-write) is ignored."""
    rows = []
    if not path.exists():
        return rows
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"[quality] {path}:{n}: ignoring an unreadable line", file=sys.stderr)
    return rows


class ResultsWriter:
    """Appends one JSON line per result, flushed, so a kill loses at most the line in flight."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = path.exists() and path.stat().st_size > 0 and \
            not path.read_bytes().endswith(b"\n")
        self._f = open(path, "a")
        if needs_newline:  # a torn line from an earlier kill: start on a fresh line
            self._f.write("\n")

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
