from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from defectvlm.cluster.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def regions(regions: dict, model: dict, splits: Input[Dataset], candidates: Output[Dataset]):
    """splits -> ROI candidates in the model's frame."""
    from defectvlm.cluster.steps import run_step

    run_step("regions", {"regions": regions, "model": model}, **{"in": splits.path, "out": candidates.path})
