"""Deployment constants, defined once: what the cluster side of captioner is called and where
it runs (Secret names and env maps, node pools, images, the pinned Triton release, file names
that several modules agree on). Modules import these instead of repeating string literals."""
from __future__ import annotations

# --- object storage credentials (Kubernetes Secret and the env it becomes) ---

# --- training on the cluster (images, node pools, checkpoint files) ---

# --- serving (pinned Triton release, its onnxruntime, control-API key) ---
TRITON_RELEASE = "25.01"  # the one place the Triton release is pinned (docker/triton.Dockerfile FROM, tests)
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-py3"
# onnxruntime that Triton 25.01's onnxruntime backend ships (Triton release notes 25.01 / the
# framework support matrix: "ONNX Runtime 1.20.1"); exported graphs are tested in this version.
TRITON_ONNXRUNTIME = "1.20.1"
# The model-repository protocol (load / unload / index) is restricted to callers sending this
# header with the key from the Secret (tritonserver --grpc-restricted-protocol / --http-restricted-api).
CONTROL_HEADER = "captioner-model-repository-key"
CONTROL_SECRET = "captioner-triton-control"  # Secret name; its data key is CONTROL_SECRET_KEY
CONTROL_SECRET_KEY = "key"
CONTROL_KEY_ENV = "CAPTIONER_TRITON_CONTROL_KEY"  # env the deploy step (and Triton's args) read the key from
