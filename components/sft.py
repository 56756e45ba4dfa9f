from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from defectvlm.cluster.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def sft(sft: dict, candidates: Input[Dataset], conversations: Output[Dataset]):
    """ROI candidates -> SFT conversations."""
    from defectvlm.cluster.steps import run_step

    run_step("sft", {"sft": sft}, **{"in": candidates.path, "out": conversations.path})
