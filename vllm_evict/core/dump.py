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
