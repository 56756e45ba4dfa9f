"""Atomic file writes: every output appears whole or not at all (temp file + rename)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from defectvlm.errors import StepFailure


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dumps(record: Any) -> str:
    """One canonical JSON text: UTF-8 characters kept, key order as given."""
    return json.dumps(record, ensure_ascii=False)


def write_json_atomic(path: str | Path, record: Any) -> None:
    write_bytes_atomic(path, (json.dumps(record, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))


def write_jsonl_atomic(path: str | Path, records: Iterable[Any]) -> None:
    write_bytes_atomic(path, "".join(dumps(r) + "\n" for r in records).encode("utf-8"))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a bad line is an error naming the file and line."""
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise StepFailure(f"{path}:{number}: not valid JSON: {exc.msg}") from None
    except OSError as exc:
        raise StepFailure(f"{path}: cannot read ({exc.strerror}); did the step that writes it run?") from None
    return records
