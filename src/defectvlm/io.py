"""Atomic file writes: every output appears whole or not at all (temp file + rename); reads
of JSON / YAML files whose errors name the file (and the setting that points at it)."""

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
    except OSError as exc:  # a full disk fails inside write(), which does not say which file
        Path(tmp).unlink(missing_ok=True)
        raise type(exc)(exc.errno, exc.strerror, exc.filename or str(path)) from exc
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


def _source(path: str | Path, setting: str) -> str:
    return f"{path} ({setting})" if setting else str(path)


def read_json_file(path: str | Path, setting: str = "") -> Any:
    """A JSON file; a missing or malformed file is a StepFailure naming it and its setting."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise StepFailure(f"{_source(path, setting)}: cannot read ({exc.strerror}): fix the path") from None
    except json.JSONDecodeError as exc:
        raise StepFailure(
            f"{_source(path, setting)}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno}): fix the file"
        ) from None


def read_yaml_file(path: str | Path, setting: str = "") -> Any:
    """A YAML file; a missing or malformed file is a StepFailure naming it and its setting."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise StepFailure(f"{_source(path, setting)}: cannot read ({exc.strerror}): fix the path") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise StepFailure(f"{_source(path, setting)}{line}: not valid YAML ({problem}): fix the file") from None


def read_splits(folder: str | Path, names: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """`<folder>/<name>.jsonl` for each split name."""
    return {name: read_jsonl(Path(folder) / f"{name}.jsonl") for name in names}


def write_splits(folder: str | Path, splits: dict[str, Iterable[Any]]) -> None:
    for name, records in splits.items():
        write_jsonl_atomic(Path(folder) / f"{name}.jsonl", records)
