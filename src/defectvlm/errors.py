"""Errors a user can act on; the CLI prints their message, never a traceback (unless --debug
or DEFECTVLM_DEBUG=1 asks for one)."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable

import yaml
from pydantic import ValidationError

from defectvlm.config import ConfigError, describe


class StepFailure(RuntimeError):
    """A step ran into a hard rule (missing input, too many rejects); the message says which."""


def _settings_holding(values: dict, path: str, prefix: str = "") -> list[str]:
    """The dotted params.yaml keys whose value is `path` (e.g. sft.templates, train.deepspeed)."""
    keys = []
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            keys += _settings_holding(value, path, f"{dotted}.")
        elif isinstance(value, str) and value and path in (value, value.rstrip("/")):
            keys.append(dotted)
    return keys


def _describe_os_error(exc: OSError, settings: list[str]) -> str:
    """One paragraph for a failed file operation: which file, what happened, what to do."""
    where = exc.filename or "a file this step writes"
    named = f" (set by {', '.join(settings)} in params.yaml)" if settings else ""
    if exc.errno == errno.ENOSPC:
        return (
            f"no space left on the device while writing {where}{named}: free some space there, or point the "
            "step's --out (or train.output_dir) at a disk with room, and run the step again"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"{where}{named}: permission denied ({exc.strerror}): make it readable/writable for this user "
            "(or the folder it is in), or choose another path"
        )
    if exc.errno == errno.ENOENT:
        return f"{where}{named}: no such file or folder: fix the path, or run the step that writes it first"
    return f"{where}{named}: {exc.strerror or exc}: check the path and the device it is on"


def _describe_decode_error(exc: ValueError) -> str:
    """Malformed JSON or YAML that no reader named (the readers in defectvlm.io name the file)."""
    kind = "JSON" if isinstance(exc, json.JSONDecodeError) else "YAML"
    return f"a file this step reads is not valid {kind} ({exc}): fix the file; run with --debug to see which reader"


def explain(exc: Exception, params_values: Callable[[], dict]) -> tuple[int, str, str] | None:
    """(exit code, kind, one-paragraph message) for an error the user can fix; None for a bug.
    `params_values` gives the step's parameters, to name the setting that points at a file."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, ConfigError):
        return 2, "parameter error", str(exc)
    if isinstance(exc, ValidationError):  # a section built from a recorded file, e.g. an adapter's prompt.json
        return 2, "parameter error", describe(exc)
    if isinstance(exc, StepFailure):
        return 1, "error", str(exc)
    if isinstance(exc, OSError):
        try:
            settings = _settings_holding(params_values(), str(exc.filename)) if exc.filename else []
        except Exception:  # noqa: BLE001 - naming the setting is a courtesy; the file is named anyway
            settings = []
        return 1, "error", _describe_os_error(exc, settings)
    if isinstance(exc, MlflowException):
        import mlflow

        return (
            1,
            "MLflow error",
            (
                f"the tracking store at {mlflow.get_tracking_uri()} (tracking.uri) refused the request: {exc.message}. "
                "Check the server's log and your credentials (MLFLOW_TRACKING_* in the environment)"
            ),
        )
    if isinstance(exc, (json.JSONDecodeError, yaml.YAMLError)):
        return 1, "error", _describe_decode_error(exc)
    return None
