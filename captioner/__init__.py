"""captioner: image captioning from ingest to Triton serving, orchestrated by Kubeflow."""
__version__ = "0.1.0"
