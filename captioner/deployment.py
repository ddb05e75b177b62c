"""Deployment constants, defined once: what the cluster side of captioner is called and where
it runs (Secret names and env maps, node pools, images, the pinned Triton release, file names
that several modules agree on). Modules import these instead of repeating string literals."""
from __future__ import annotations

# --- object storage credentials (Kubernetes Secret and the env it becomes) ---

# --- training on the cluster (images, node pools, checkpoint files) ---

# --- serving (pinned Triton release, its onnxruntime, control-API key) ---
