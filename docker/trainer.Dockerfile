# Trainer / pipeline-step image: the captioner package with CUDA PyTorch.
# Build from the repository root: docker build -f docker/trainer.Dockerfile -t ghcr.io/captioner/trainer:0.1.0 .
FROM nvcr.io/nvidia/pytorch:25.01-py3

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/captioner
COPY pyproject.toml README.md ./
COPY captioner ./captioner
COPY configs ./configs

# the base image already has torch; install the rest without replacing it
RUN pip install --no-deps -e . \
    && pip install "timm>=1.0" "tokenizers>=0.20" "pillow>=10" "pyyaml>=6" "tqdm>=4.66" "onnx>=1.16" \
       "onnxruntime-gpu>=1.18" "onnxscript>=0.2" "pycocoevalcap>=1.2" "tritonclient[grpc]>=2.50" \
       "minio>=7.2" "kfp==2.17.3" "kfp-kubernetes==2.17.3" "kubernetes>=30" \
       "tensorboard>=2.16" "matplotlib>=3.8" "boto3>=1.34"

RUN groupadd --gid 1000 captioner && useradd --uid 1000 --gid 1000 --create-home captioner
USER 1000:1000
WORKDIR /workspace
ENTRYPOINT []
CMD ["captioner", "--help"]
