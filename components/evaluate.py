from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from defectvlm.cluster.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def evaluate(
    model: dict,
    train: dict,
    tracking: dict,
    conversations: Input[Dataset],
    cluster: dict,
    job_id: str,
    data_version: str,
    lineage: dict,
    phase1: Input[Model],
    phase2: Input[Model],
    phase3: Input[Model],
    reports: Output[Artifact],
    metrics: Output[Metrics],
):
    """The last enabled phase on test (threshold from val): metrics.json, report.md, plots."""
    import json
    from pathlib import Path

    from defectvlm.cluster.steps import run_on_phases

    run_on_phases(
        "evaluate",
        {"model": model, "train": train, "tracking": tracking},
        cluster,
        job_id,
        {1: phase1.path, 2: phase2.path, 3: phase3.path},
        data_version,
        lineage,
        **{"in": conversations.path, "out": reports.path},
    )
    result = json.loads((Path(reports.path) / "metrics.json").read_text(encoding="utf-8"))
    for level in ("roi", "image"):
        for key, value in result[result["split"]][level].items():
            if isinstance(value, (int, float)):
                metrics.log_metric(f"{result['split']}_{level}_{key}", value)
