"""Kubeflow Pipelines v2: the steps (plain functions), the thin KFP components over them, the
pipeline, and compiling/running it locally or on a cluster. May import every package above."""
