# Triton image: tritonserver plus the captioner package, which the Python-backend models
# (preprocess, decode_loop; sources in captioner/triton/) import. CPU-only dependencies: the ONNX models run in
# Triton's onnxruntime backend, not in Python.
# Build from the repository root: docker build -f docker/triton.Dockerfile -t ghcr.io/captioner/triton:0.1.0 .
# The release is pinned in captioner/deployment.py (TRITON_IMAGE); tests/test_triton_k8s.py checks they agree.
FROM nvcr.io/nvidia/tritonserver:25.01-py3

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/captioner
COPY pyproject.toml README.md ./
COPY captioner ./captioner

RUN pip install --no-deps . \
    && pip install "numpy>=1.24" "pillow>=10" "tokenizers>=0.20" "pyyaml>=6"

RUN groupadd --gid 1000 triton-user || true \
    && useradd --uid 1000 --gid 1000 --no-create-home triton-user || true
USER 1000:1000
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models"]
