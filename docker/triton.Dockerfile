# Triton image: tritonserver plus the captioner package with its serving extra only
# (`captioner[serve-gpu]`: numpy, pillow, tokenizers, onnxruntime-gpu, tritonclient; no torch,
# no ONNX export code). The Python-backend models (preprocess, decode_loop; sources in
# captioner/serving/triton/) import it: decode_loop runs the decoder graph in process with
# onnxruntime-gpu, pinned to the onnxruntime Triton's own onnxruntime backend ships, and NumPy 1
# (the release's Python-backend stub is built with pybind11 v2.10.0, before NumPy 2's ABI).
# Build from the repository root: docker build -f docker/triton.Dockerfile -t ghcr.io/captioner/triton:0.1.0 .
# The release is pinned in captioner/core/deployment.py (TRITON_IMAGE); tests/cluster/test_triton_k8s.py checks they agree,
# tests/serving/test_lean_serving.py that this installs the serving extra and nothing else.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/captioner
COPY pyproject.toml README.md ./
COPY captioner ./captioner

RUN pip install --no-cache-dir "./[serve-gpu]"

RUN groupadd --gid 1000 triton-user || true \
    && useradd --uid 1000 --gid 1000 --no-create-home triton-user || true
USER 1000:1000
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models"]
