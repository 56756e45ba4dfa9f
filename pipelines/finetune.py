"""The fine-tuning pipeline (compiled: finetune.yaml, by `defectvlm pipeline compile`), built from
the step table by defectvlm.cluster.dag: `build(params)` gives the KFP pipeline for a params file."""

from defectvlm.cluster.dag import NAME, build

__all__ = ["NAME", "build"]
