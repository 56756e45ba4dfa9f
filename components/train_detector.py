from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from defectvlm.cluster.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def train_detector(
    detector: dict, regions: dict, registry: dict, tracking: dict, splits: Input[Dataset], model: Output[Model]
):
    """split train/val -> the cascade's proposal detector (CPU), its ONNX export and registry version."""
    from defectvlm.cluster.steps import run_step

    sections = {"detector": {**detector, "output_dir": model.path}, "regions": regions}
    run_step("train_detector", {**sections, "registry": registry, "tracking": tracking}, **{"in": splits.path})
