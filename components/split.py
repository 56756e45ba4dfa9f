from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from defectvlm.cluster.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def split(split: dict, ingested: Input[Dataset], splits: Output[Dataset]):
    """manifest -> train/val/test by group."""
    from defectvlm.cluster.steps import run_step

    run_step("split", {"split": split}, **{"in": ingested.path, "out": splits.path})
