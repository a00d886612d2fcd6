"""Debug dump of kept positions: VLLM_EVICT_DUMP_DIR=path writes one JSON line per request per
compaction, {request_id, step, logical_len, kept: [layer][kv_head][positions]}."""

from __future__ import annotations

import json
import os
from pathlib import Path

DUMP_DIR_ENV = "VLLM_EVICT_DUMP_DIR"


class KeptPositionsDump:
    def __init__(self, directory: str, rank: int) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / f"kept-rank{rank}-pid{os.getpid()}.jsonl"

    @classmethod
    def from_env(cls, rank: int) -> KeptPositionsDump | None:
        directory = os.environ.get(DUMP_DIR_ENV)
        return cls(directory, rank) if directory else None

    def write(self, request_id: str, step: int, logical_len: int, kept: list) -> None:
        """kept: [layer][kv_head] logical positions attention sees (per-layer counts may differ)."""
        record = {"request_id": request_id, "step": step, "logical_len": logical_len, "kept": kept}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_dump(directory: str | os.PathLike) -> list[dict]:
    """All records under `directory`, in the order they were written per file."""
    records = []
    for file in sorted(Path(directory).glob("kept-*.jsonl")):
        records += [json.loads(line) for line in file.read_text().splitlines() if line]
    return records


def records_for(records: list[dict], request_id: str) -> list[dict]:
    """The records of one request. vLLM appends a suffix to the id a client gave
    ("0" becomes "0-97f732ea"), so both forms match."""
    return [r for r in records
            if r["request_id"] == request_id or r["request_id"].startswith(f"{request_id}-")]


PAGE_TRACE_DIR_ENV = "VLLM_EVICT_PAGE_TRACE_DIR"


class PageTrace:
    """VLLM_EVICT_PAGE_TRACE_DIR=path: the scheduler writes, for every step, the pages each
    running request holds during that step's forward pass, as JSON lines
    {step, request_id, logical_len, pages}. Exact (the scheduler's own block lists), not
    sampled, so a request's peak is the maximum over its lines."""

    def __init__(self, directory: str) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / f"pages-pid{os.getpid()}.jsonl"
        self.step = 0

    @classmethod
    def from_env(cls) -> PageTrace | None:
        directory = os.environ.get(PAGE_TRACE_DIR_ENV)
        return cls(directory) if directory else None

    def write(self, rows: list[tuple[str, int, int]]) -> None:
        """rows: (request_id, logical_len after this step, pages held) per running request."""
        self.step += 1
        if not rows:
            return
        with self.path.open("a") as f:
            for request_id, logical_len, pages in rows:
                f.write(json.dumps({"step": self.step, "request_id": request_id,
                                    "logical_len": logical_len, "pages": pages}) + "\n")


def read_page_trace(directory: str | os.PathLike) -> list[dict]:
    records = []
    for file in sorted(Path(directory).glob("pages-*.jsonl")):
        records += [json.loads(line) for line in file.read_text().splitlines() if line]
    return records
