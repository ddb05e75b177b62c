# Web gateway image (`captioner web`): the captioner package without torch, onnxruntime or timm,
# only what the page, the JSON API and the gRPC client need (tests/cluster/test_web_k8s.py checks that
# captioner.web.gateway imports without the training stack).
# Build from the repository root: docker build -f docker/web.Dockerfile -t ghcr.io/captioner/web:0.1.0 .
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/captioner
COPY pyproject.toml README.md ./
COPY captioner ./captioner

RUN pip install --no-deps . \
    && pip install "numpy==2.4.6" "pillow==13.0.0" "tokenizers==0.23.3" "grpcio==1.85.3" "protobuf==6.33.6" \
       "tritonclient[grpc]==2.73.0" "fastapi==0.163.2" "uvicorn==0.54.0" "python-multipart==0.0.34" \
       "prometheus-client==0.26.0" "pyyaml==6.0.4" "tqdm==4.70.1"

RUN groupadd --gid 1000 captioner && useradd --uid 1000 --gid 1000 --no-create-home captioner
USER 1000:1000
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["captioner", "web"]
CMD ["--url", "triton:8001", "--host", "0.0.0.0", "--port", "8080"]
