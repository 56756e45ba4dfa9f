"""The cluster path: the KFP pipeline's step helpers, its compile/run/submit commands, and
multi-node training as a Kubeflow Trainer TrainJob."""
