"""All parameters of a run: one section per step family, and their one-line docs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from defectvlm.config.base import Section
from defectvlm.config.cluster import ClusterParams, TrainJobParams
from defectvlm.config.data import (
    DataParams,
    IngestParams,
    LabelParams,
    ModelParams,
    RegionParams,
    SftParams,
    SplitParams,
)
from defectvlm.config.serve import ServeParams
from defectvlm.config.train import DetectorParams, RegistryParams, TrackingParams, TrainParams


class Params(Section):
    """All parameters of a pipeline run (one section per step family)."""

    data: DataParams = Field(DataParams(), description="Input folders.")
    labels: LabelParams = Field(LabelParams(), description="Label parsing and class mapping.")
    ingest: IngestParams = Field(IngestParams(), description="Ingest checks.")
    split: SplitParams = Field(SplitParams(), description="Train/val/test split.")
    model: ModelParams = Field(ModelParams(), description="Model family and image budget.")
    regions: RegionParams = Field(RegionParams(), description="ROI candidates.")
    sft: SftParams = Field(SftParams(), description="SFT conversations.")
    train: TrainParams = Field(TrainParams(), description="Phased training.")
    tracking: TrackingParams = Field(TrackingParams(), description="Experiment tracking.")
    registry: RegistryParams = Field(RegistryParams(), description="Model registry and promotion gates.")
    detector: DetectorParams = Field(DetectorParams(), description="Proposal detector of the cascade (train-detector).")
    trainjob: TrainJobParams = Field(TrainJobParams(), description="Multi-node training (train.launcher: trainjob).")
    cluster: ClusterParams = Field(ClusterParams(), description="Kubeflow Pipelines: images, resources, secrets.")
    serve: ServeParams = Field(ServeParams(), description="The inspection service (defectvlm serve).")


def field_docs(cls: type[BaseModel] = Params, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, description, default) for every leaf field, in declaration order."""
    rows = []
    for name, info in cls.model_fields.items():
        key = f"{prefix}{name}"
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            rows.extend(field_docs(info.annotation, key + "."))
        else:
            rows.append((key, info.description or "", info.get_default(call_default_factory=True)))
    return rows
