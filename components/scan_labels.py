from kfp import dsl
from kfp.dsl import Artifact, Output

from defectvlm.cluster.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def scan_labels(data: dict, labels: dict, ingest: dict, data_version: str, label_stats: Output[Artifact]):
    """Raw label distribution and box sizes -> label_stats.json."""
    from defectvlm.cluster.steps import run_step

    run_step("scan_labels", {"data": data, "labels": labels, "ingest": ingest}, out=label_stats.path)
    label_stats.metadata["data_version"] = data_version
