"""Kubernetes objects and launchers: the training job spec, PyTorchJob and Trainer v2 TrainJob
builders, the launcher that creates and watches them, KServe InferenceServices. Imports core, io
and serving."""
