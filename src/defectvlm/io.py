"""Atomic file writes: every output appears whole or not at all (temp file + rename)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from defectvlm.errors import StepFailure

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, record: Any) -> None:
    """A human-readable JSON file (reports, summaries)."""
    write_bytes_atomic(path, (json.dumps(record, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))


def write_jsonl_atomic(path: str | Path, records: Iterable[Any]) -> None:
    """One compact JSON object per line, UTF-8, keys in the order given (orjson: fast and canonical)."""
    write_bytes_atomic(path, b"".join(orjson.dumps(r) + b"\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a bad line is an error naming the file and line."""
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    raise StepFailure(f"{path}:{number}: not valid JSON: {exc}") from None
    except OSError as exc:
        raise StepFailure(f"{path}: cannot read ({exc.strerror}); did the step that writes it run?") from None
    return records


def read_splits(folder: str | Path, names: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """`<folder>/<name>.jsonl` for each split name."""
    return {name: read_jsonl(Path(folder) / f"{name}.jsonl") for name in names}


def write_splits(folder: str | Path, splits: dict[str, Iterable[Any]]) -> None:
    for name, records in splits.items():
        write_jsonl_atomic(Path(folder) / f"{name}.jsonl", records)
