from kfp import dsl
from kfp.dsl import Dataset, Output

from defectvlm.cluster.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def ingest(data: dict, labels: dict, ingest: dict, data_version: str, ingested: Output[Dataset]):
    """Both image trees -> manifest.jsonl + ingest_report.json (the images stay where they are)."""
    import json
    from pathlib import Path

    from defectvlm.cluster.steps import run_step

    run_step("ingest", {"data": data, "labels": labels, "ingest": ingest}, out=ingested.path)
    report = json.loads((Path(ingested.path) / "ingest_report.json").read_text(encoding="utf-8"))
    ingested.metadata.update(data_version=data_version, **report["counts"])
