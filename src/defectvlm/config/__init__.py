"""params.yaml -> frozen pydantic models, one per section, validated on load.

Every field has a one-line `description`, which `defectvlm params` prints. Loading rejects
unknown keys, wrong types and impossible values with a `ConfigError` naming the file, the line
and the full dotted key. The sections live by family: data.py (raw data to SFT conversations),
train.py (training, tracking, registry, detector), cluster.py, serve.py; loading.py holds the
whole (`Params`), reads it from a file and writes it back to a dict. base.py: what every
section shares (strict, frozen, unknown keys refused) and the error types.
"""

from defectvlm.config.base import ConfigError, Section
from defectvlm.config.cluster import ClusterParams, TrainJobParams
from defectvlm.config.data import (
    SPLITS,
    TASKS,
    DataParams,
    IngestParams,
    LabelFormat,
    LabelParams,
    ModelParams,
    RegionParams,
    SftParams,
    SplitParams,
)
from defectvlm.config.loading import Params, describe, field_docs, load_params, params_from_dict, params_to_dict
from defectvlm.config.serve import ServeParams
from defectvlm.config.train import (
    GATE_METRICS,
    METRIC_DIRECTIONS,
    DetectorParams,
    LoraParams,
    PhaseParams,
    RegistryParams,
    TrackingParams,
    TrainParams,
)

__all__ = [
    "GATE_METRICS",
    "METRIC_DIRECTIONS",
    "SPLITS",
    "TASKS",
    "ClusterParams",
    "ConfigError",
    "DataParams",
    "DetectorParams",
    "IngestParams",
    "LabelFormat",
    "LabelParams",
    "LoraParams",
    "ModelParams",
    "Params",
    "PhaseParams",
    "RegionParams",
    "RegistryParams",
    "Section",
    "ServeParams",
    "SftParams",
    "SplitParams",
    "TrackingParams",
    "TrainJobParams",
    "TrainParams",
    "describe",
    "field_docs",
    "load_params",
    "params_from_dict",
    "params_to_dict",
]
