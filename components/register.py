from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from defectvlm.cluster.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def register(
    data: dict,
    model: dict,
    train: dict,
    tracking: dict,
    registry: dict,
    cluster: dict,
    job_id: str,
    data_version: str,
    lineage: dict,
    phase1: Input[Model],
    phase2: Input[Model],
    phase3: Input[Model],
    conversations: Input[Dataset],
    reports: Input[Artifact],
    registration: Output[Artifact],
):
    """The evaluated adapter -> a new version of registry.model_name with alias `candidate`."""
    import json
    from pathlib import Path

    from defectvlm.cluster.steps import run_on_phases

    run_on_phases(
        "register",
        {"data": data, "model": model, "train": train, "tracking": tracking, "registry": registry},
        cluster,
        job_id,
        {1: phase1.path, 2: phase2.path, 3: phase3.path},
        data_version,
        lineage,
        **{"reports": reports.path, "in": conversations.path, "out": registration.path},
    )
    registration.metadata.update(json.loads((Path(registration.path) / "registration.json").read_text()))
