from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from defectvlm.cluster.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def train_phase(
    phase: int,
    model: dict,
    train: dict,
    tracking: dict,
    sft: dict,
    trainjob: dict,
    cluster: dict,
    job_id: str,
    data_version: str,
    lineage: dict,
    conversations: Input[Dataset],
    adapter: Output[Model],
    phase1: Input[Model] = None,
    phase2: Input[Model] = None,
):
    """One training phase (its checkpoints stay on the workspace; best/ and metrics become `adapter`)."""
    from defectvlm.cluster import steps

    earlier = {n: a.path for n, a in ((1, phase1), (2, phase2)) if a is not None}
    metrics = steps.train_phase(
        phase,
        {"model": model, "train": train, "tracking": tracking, "sft": sft},
        trainjob,
        cluster,
        conversations.path,
        earlier,
        job_id,
        adapter.path,
        data_version,
        lineage,
    )
    adapter.metadata.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})
