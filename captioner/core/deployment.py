"""Deployment constants, defined once: what the cluster side of captioner is called and where
it runs (Secret names and env maps, node pools, images, the pinned Triton release, file names
that several modules agree on). Modules import these instead of repeating string literals."""
from __future__ import annotations

# --- object storage credentials (Kubernetes Secret and the env it becomes) ---
# Each component has its own MinIO user (k8s/base/minio.yaml: the minio-users Job) and its
# own Secret with the same three keys; the pipeline steps' Secret lives where the steps run
# (namespace `kubeflow` for single-user KFP, the profile namespace for multi-user).
S3_SECRET = "captioner-s3"  # pipeline steps (KFP pods)
TRAINER_S3_SECRET = "captioner-trainer-s3"  # PyTorchJob workers
S3_ENV = {"endpoint": "CAPTIONER_S3_ENDPOINT", "access-key": "AWS_ACCESS_KEY_ID", "secret-key": "AWS_SECRET_ACCESS_KEY"}
BUCKETS = ("datasets", "models")  # created by the minio-users Job

# --- training on the cluster (images, node pools) ---
TRAINER_IMAGE = "ghcr.io/captioner/trainer:0.1.0"  # also the KFP components' base image
JOB_NAMESPACE = "captioner"  # where PyTorchJobs, MinIO and Triton run
TRAINER_SERVICE_ACCOUNT = "captioner-trainer"  # no RBAC bindings, token not mounted
# Who runs KFP steps: single-user KFP runs every step as kubeflow/pipeline-runner; multi-user
# Kubeflow runs them as default-editor in the user's profile namespace.
KFP_STEP_NAMESPACE = "kubeflow"
KFP_STEP_SERVICE_ACCOUNT = "pipeline-runner"
# The operator's rendezvous port (training-operator v1.9 PyTorchJobDefaultPort / PortName).
RDZV_PORT, RDZV_PORT_NAME = 23456, "pytorchjob-port"
GPU_NODE_SELECTOR = ("cloud.google.com/gke-accelerator", "nvidia-tesla-a100")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# GPU node pools per cloud: (node selector, tolerations) for the PyTorchJob workers.
NODE_POOLS = {
    "gke": (dict([GPU_NODE_SELECTOR]), [GPU_TOLERATION]),
    "eks": ({"node.kubernetes.io/instance-type": "p4d.24xlarge"}, [GPU_TOLERATION]),
    "aks": ({"agentpool": "a100"}, [{"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]),
    "kind": ({}, []),
}
# Oldest KFP backend that runs the compiled IR correctly (tests/pipeline/test_captioning.py derives it
# from the IR): the driver resolves `{{$.pipeline_job_uuid}}` (the train step's run id) only
# since 2.5.0 (kubeflow/pipelines PR #11599), which also reads secretNameParameter.
MIN_KFP_BACKEND = "2.5.0"
TRAINING_OPERATOR_VERSION = "v1.9.0"

# --- serving (pinned Triton release, its onnxruntime, control-API key) ---
# One Triton release for the cluster and the tests: the tests run the tritonserver that the
# nvidia-pytriton 0.7.0 wheel bundles (2.51.0, NGC release 24.10; captioner.serving.triton_server), so the
# cluster image is pinned to the same release.
TRITON_RELEASE = "24.10"  # the one place the Triton release is pinned (docker/triton.Dockerfile FROM, tests)
TRITON_SERVER_VERSION = "2.51.0"  # tritonserver's own version in that release (server build.py TRITON_VERSION_MAP)
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-py3"
# onnxruntime that Triton 24.10's onnxruntime backend ships (server build.py TRITON_VERSION_MAP
# "2.51.0": ORT "1.19.2"); exported graphs are tested in this version, the Triton image's
# onnxruntime-gpu and the real server's Python-based onnxruntime backend run it.
TRITON_ONNXRUNTIME = "1.19.2"
# The model-repository protocol (load / unload / index) is restricted to callers sending this
# header with the key from the Secret (tritonserver --grpc-restricted-protocol / --http-restricted-api).
CONTROL_HEADER = "captioner-model-repository-key"
# The header a client sends is not the same on both protocols: over gRPC tritonserver expects the
# metadata key "triton-grpc-protocol-" + KEY (server src/grpc/grpc_server.h
# kRestrictedProtocolHeaderTemplate, lower case because HTTP/2 headers are), over HTTP the bare KEY
# (src/http_server.cc, RespondIfRestricted).
GRPC_RESTRICTED_HEADER_PREFIX = "triton-grpc-protocol-"


def control_headers(key: str, protocol: str = "grpc") -> dict[str, str]:
    """The headers that open the restricted model-repository protocol with `key`, per protocol."""
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return {(GRPC_RESTRICTED_HEADER_PREFIX if protocol == "grpc" else "") + CONTROL_HEADER: key}


CONTROL_SECRET = "captioner-triton-control"  # Secret name; its data key is CONTROL_SECRET_KEY
CONTROL_SECRET_KEY = "key"
# "1": the decode loop's step-graph session spins between runs (captioner.serving.onnx_runtime.decoder_spin)
DECODER_SPIN_ENV = "CAPTIONER_DECODER_SPIN"
CONTROL_KEY_ENV = "CAPTIONER_TRITON_CONTROL_KEY"  # env the deploy step (and Triton's args) read the key from


# --- tritonserver's flags: one list for the cluster (k8s/base/triton.yaml's args, checked by
# tests/cluster/test_triton_k8s.py) and the real server that tests and `make demo` run (captioner.serving.triton_server)
TRITON_SERVING_URI = "s3://minio.captioner.svc.cluster.local:9000/models/serving"


def triton_server_args(model_repository: str = TRITON_SERVING_URI, control_key: str = f"$({CONTROL_KEY_ENV})",
                       load: str = "captioner") -> list[str]:
    """tritonserver's arguments: the repository read in place, explicit model control loading
    the ensemble, strict readiness, no exit on a bad model, and the model-repository protocol
    restricted to callers holding the control key on gRPC and HTTP (the default `control_key`
    is the Secret's env, expanded by Kubernetes)."""
    return [f"--model-repository={model_repository}", "--model-control-mode=explicit", f"--load-model={load}",
            "--strict-readiness=true", "--exit-on-error=false",
            f"--grpc-restricted-protocol=model-repository:{CONTROL_HEADER}={control_key}",
            f"--http-restricted-api=model-repository:{CONTROL_HEADER}={control_key}"]
