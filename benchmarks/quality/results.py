"""The quality benchmark's results: RULER's score of one answer, and the resumable JSONL file
(one flushed line per result; a torn last line from a kill is skipped).

The default results file lives in .cache/, which a new machine does not have, so every row
written there also goes, without the model's output text, to a tracked twin,
docs/results/quality_scores.jsonl. Reading the default file reads the twin too: a run resumes,
and the report renders, from the rows of every earlier session that committed them."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = ROOT / ".cache" / "quality" / "results.jsonl"
SCORES = ROOT / "docs" / "results" / "quality_scores.jsonl"
"""The tracked twin of DEFAULT_RESULTS: its rows without `output` (the haystacks are not ours
to publish, and the scores are what the report reads)."""


def score(output: str, answers: Iterable[str]) -> float:
    """RULER string_match_all for one sample: the fraction of answers in the output (0..1)."""
    answers = list(answers)
    text = output.lower()
    return sum(a.lower() in text for a in answers) / len(answers) if answers else 0.0



def row_key(row: dict[str, Any]) -> tuple:
    """One row per (model, sample, policy, budget) and setting: the server flags a row records
    (e.g. `--kv-prefill-eviction`, question after compression) make another setting of the same
    sample, not a row already done."""
    return (row["model"], row["id"], row["policy"], row["budget"], row.get("server_args") or "")


def scores_twin(path: Path) -> Path | None:
    """SCORES for the default results file; None for any other (tests, variants)."""
    return SCORES if path.resolve() == DEFAULT_RESULTS.resolve() else None


def _read_lines(path: Path) -> list[dict[str, Any]]:
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


def read_results(path: Path) -> list[dict[str, Any]]:
    """Every complete row; a torn last line (from a kill mid-write) is ignored. For the default
    file, also the twin's rows that it lacks (those of earlier machines)."""
    rows = _read_lines(path)
    twin = scores_twin(path)
    if twin is not None:
        seen = {row_key(r) for r in rows}
        rows += [r for r in _read_lines(twin) if row_key(r) not in seen]
    return rows


class ResultsWriter:
    """Appends one JSON line per result, flushed, so a kill loses at most the line in flight."""

    def __init__(self, path: Path) -> None:
        self._f = self._open(path)
        twin = scores_twin(path)
        self._twin = self._open(twin) if twin is not None else None

    @staticmethod
    def _open(path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = path.exists() and path.stat().st_size > 0 and \
            not path.read_bytes().endswith(b"\n")
        f = open(path, "a")
        if needs_newline:  # a torn line from an earlier kill: start on a fresh line
            f.write("\n")
        return f

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._twin is not None:
            self._twin.write(json.dumps({k: v for k, v in row.items() if k != "output"}) + "\n")
            self._twin.flush()

    def close(self) -> None:
        self._f.close()
        if self._twin is not None:
            self._twin.close()
