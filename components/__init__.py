"""The KFP components, one per step, generated from the step table (defectvlm.steps) by
defectvlm.cluster.components: `from components import split` for a pipeline of your own."""

from defectvlm.cluster.components import components

globals().update(components())
