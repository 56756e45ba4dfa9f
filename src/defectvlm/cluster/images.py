"""The two container images every pipeline step runs in: names in one place.

`python -m defectvlm.cluster.images data|train [PARAMS]` prints the name under the params file's
`cluster.image_registry` (`make images` tags with it; the compiled pipeline uses the same name).
"""

from __future__ import annotations

import sys
from importlib.metadata import version

from defectvlm.config import ClusterParams, load_params

DEFAULT_REGISTRY = ClusterParams().image_registry
DOCKERFILES = {"data": "dockerfiles/data.Dockerfile", "train": "dockerfiles/train.Dockerfile"}


def image(kind: str, registry: str = DEFAULT_REGISTRY) -> str:
    """`<registry>/defectvlm-<kind>:<package version>`; kind is data (CPU steps) or train (CUDA)."""
    if kind not in DOCKERFILES:
        raise ValueError(f"unknown image kind {kind!r} (known: {', '.join(DOCKERFILES)})")
    return f"{registry.rstrip('/')}/defectvlm-{kind}:{version('defectvlm')}"


DATA_IMAGE = image("data")
TRAIN_IMAGE = image("train")

if __name__ == "__main__":
    kind, params_file = (sys.argv[1:] + ["params.yaml"])[:2]
    print(image(kind, load_params(params_file).cluster.image_registry))
