from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from defectvlm.cluster.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def sft(sft: dict, model: dict, candidates: Input[Dataset], conversations: Output[Dataset]):
    """ROI candidates -> SFT conversations (and a swift / LLaMA-Factory / YOLO export in the model's frame)."""
    from defectvlm.cluster.steps import run_step

    run_step("sft", {"sft": sft, "model": model}, **{"in": candidates.path, "out": conversations.path})
