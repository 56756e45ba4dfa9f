"""What ingest found under the two roots, and what happened to each file (its outcome)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from defectvlm.data.images import ImageProbe

Root = Literal["abnormal", "normal"]
Status = Literal["accepted", "repaired", "rejected"]
Kind = Literal["image", "label", "class_names", "tool_file", "other"]


@dataclass(frozen=True)
class FoundFile:
    root: Root
    rel: str  # POSIX path relative to its root
    path: str  # the root as configured joined with rel
    kind: Kind
    probe: ImageProbe | None = None  # images
    data: bytes | None = None  # label and class-name files

    @property
    def id(self) -> str:
        return f"{self.root}/{self.rel}"


@dataclass
class Outcome:
    """What happened to one file; mutable while the manifest is assembled."""

    status: Status = "accepted"
    reasons: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def reject(self, reason: str, message: str | None = None) -> None:
        self.status = "rejected"
        self.note(reason, message)

    def repair(self, reason: str, message: str | None = None) -> None:
        if self.status == "accepted":
            self.status = "repaired"
        self.note(reason, message)

    def note(self, reason: str, message: str | None = None) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
        if message and message not in self.messages:
            self.messages.append(message)
