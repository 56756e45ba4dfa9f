"""Alias following: a service started on `models:/<name>@<alias>` asks the MLflow registry every
`serve.follow_interval_s` which version the alias points at. When it moves, the new version
is loaded in this background thread while the old one keeps answering, then swapped in at
once (a batch already started finishes on the old model). A version that fails to load is
logged and skipped until the alias moves again; the old model keeps serving."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

from defectvlm.errors import StepFailure
from defectvlm.serve.model import Scorer

log = logging.getLogger("defectvlm.serve")
ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")


def parse_alias_uri(uri: str) -> tuple[str, str] | None:
    """(name, alias) of a `models:/<name>@<alias>` URI, else None (nothing to follow)."""
    match = ALIAS_URI.match(uri)
    return (match["name"], match["alias"]) if match else None


class AliasFollower:
    """`load_version(version)` builds a Scorer for one registered version (its `version` set)."""

    def __init__(self, client, name: str, alias: str, load_version: Callable[[str], Scorer], interval_s: float) -> None:
        self.client, self.name, self.alias = client, name, alias
        self.load_version = load_version
        self.interval_s = interval_s
        self.failed: str | None = None

    def current_version(self) -> str:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.name, self.alias).version)
        except MlflowException as exc:
            raise StepFailure(f"models:/{self.name}@{self.alias}: not in the registry ({exc.message})") from None

    def load_current(self) -> Scorer:
        """The first model: the version the alias points at now."""
        return self.load_version(self.current_version())

    def follow(self, batcher, stop: threading.Event) -> None:
        """Runs until `stop` is set (the service shuts down)."""
        while not stop.wait(self.interval_s):
            self.check(batcher)

    def check(self, batcher) -> None:
        try:
            version = self.current_version()
        except Exception as exc:  # the registry being away must not take the service down
            log.warning("alias check failed: %s", exc)
            return
        if version == batcher.scorer.version or version == self.failed:
            return
        log.info("models:/%s@%s moved to version %s: loading it", self.name, self.alias, version)
        try:
            scorer = self.load_version(version)
        except Exception as exc:
            log.error("version %s failed to load, still serving %s: %s", version, batcher.scorer.version, exc)
            self.failed = version
            return
        batcher.swap(scorer)
        log.info("now serving version %s", version)
