"""What a step really reads, recorded while it runs: the params keys it accesses on `Params`
and the files under src/ whose functions it calls (or, for data files, opens).

A section's `model_dump()` (the adapter's record of its phase and LoRA settings) reads every key
of it. Not reads: loading and validating the params file (the config package's `_check` validators
touch every key of every step),
`params_to_dict` (a copy of the whole file: the record a phase keeps in params.json, or the base
of `-S` overrides), and MLflow logging (tracking/lineage.py, tracking/mlflow_tracking.py read every
key to record it: the pipeline key, the flattened params, the lineage tags; tracking/store_lock.py
serialises the parent run's creation), except for a step
whose output is that record (register: `records=True`). Only sections reached from a `Params`
object count (evaluate rebuilds a phase's settings from the saved adapter: not params).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from defectvlm.config import Params

SRC = Path(__file__).resolve().parents[2] / "src"
_PACKAGE = SRC / "defectvlm"
_RECORDING = {str(_PACKAGE / "tracking" / f) for f in ("lineage.py", "mlflow_tracking.py", "store_lock.py")}
_CONFIG = str(_PACKAGE / "config")
_COPYING = {
    "load_params",
    "params_from_dict",
    "params_to_dict",
    "_check",
    "_sections_keep_their_defaults",
}  # functions of the config package
_IMPORT_TIME = {"<module>", "<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>"}


@dataclass
class Reads:
    params: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)  # relative to the repository root


_active: Reads | None = None


def _param_classes(cls: type = Params) -> set[type]:
    """Params and every section model below it."""
    found = {cls}
    for info in cls.model_fields.values():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            found |= _param_classes(info.annotation)
    return found


def _not_a_read(frame, excluded_files: set[str]) -> bool:
    while frame is not None:
        code = frame.f_code
        if code.co_filename in excluded_files or (code.co_filename.startswith(_CONFIG) and code.co_name in _COPYING):
            return True
        frame = frame.f_back
    return False


def _tracer(classes: tuple[type, ...], prefixes: dict[int, str], reads: Reads, excluded_files: set[str]):
    fields = {cls: set(cls.model_fields) for cls in classes}

    def getattribute(self, name):
        value = object.__getattribute__(self, name)
        cls = type(self)
        if name not in fields.get(cls, ()):
            return value
        prefix = "" if cls is Params else prefixes.get(id(self))
        if prefix is None:
            return value
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, BaseModel):
            prefixes[id(value)] = key
        elif not _not_a_read(sys._getframe(1), excluded_files):
            reads.params.add(key)
        return value

    return getattribute


def _keys(cls: type[BaseModel], prefix: str) -> set[str]:
    """The dotted leaf keys of a section (its sub-sections' keys, not the sub-section)."""
    keys = set()
    for name, info in cls.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        sub = info.annotation
        keys |= _keys(sub, key) if isinstance(sub, type) and issubclass(sub, BaseModel) else {key}
    return keys


def _dump_tracer(prefixes: dict[int, str], reads: Reads, excluded_files: set[str]):
    def model_dump(self, *args, **kwargs):
        prefix = "" if type(self) is Params else prefixes.get(id(self))
        if prefix is not None and not _not_a_read(sys._getframe(1), excluded_files):
            reads.params |= _keys(type(self), prefix)
        return BaseModel.model_dump(self, *args, **kwargs)

    return model_dump


def _profiler(reads: Reads, excluded_files: set[str]):
    package = str(_PACKAGE)
    seen: set = set()

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if code in seen:
            return
        seen.add(code)
        if (
            code.co_filename.startswith(package)
            and code.co_filename not in excluded_files
            and code.co_name not in _IMPORT_TIME
        ):
            if code.co_flags & inspect.CO_OPTIMIZED:  # a function body, not a class body run at import
                reads.files.add(str(Path(code.co_filename).relative_to(SRC.parent)))

    return profile


def _audit(event: str, args: tuple) -> None:
    if _active is None or event != "open" or not isinstance(args[0], str | Path):
        return
    path = Path(args[0]).resolve()
    if path.is_relative_to(_PACKAGE) and path.suffix not in (".py", ".pyc") and path.is_file():
        _active.files.add(str(path.relative_to(SRC.parent)))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only while `recording` is active


@contextmanager
def recording(records: bool = False) -> Iterator[Reads]:
    """Record the params keys read and the src files run (in this thread) inside the block;
    records: the step's output is its MLflow record (tracking code counts)."""
    global _active
    reads = Reads()
    excluded = set() if records else _RECORDING
    classes = tuple(_param_classes())
    prefixes: dict[int, str] = {}
    getattribute = _tracer(classes, prefixes, reads, excluded)
    model_dump = _dump_tracer(prefixes, reads, excluded)
    for cls in classes:
        cls.__getattribute__ = getattribute
        cls.model_dump = model_dump
    _active = reads
    sys.setprofile(_profiler(reads, excluded))
    try:
        yield reads
    finally:
        sys.setprofile(None)
        _active = None
        for cls in classes:
            del cls.__getattribute__
            del cls.model_dump
