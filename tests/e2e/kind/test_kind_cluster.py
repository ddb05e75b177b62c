"""Real kind-cluster integration: create a cluster, load the images, install Training
Operator v1.9 and MinIO, run a tiny PyTorchJob (gloo on CPU), deploy Triton on CPU, caption
through tritonclient, tear down. Needs `kind`, a working Docker engine, `kubectl` and
network access to pull the operator and base images; skipped with the reason otherwise.

    CAPTIONER_KIND_E2E=1 pytest tests/e2e/kind -s
"""
import os
import shutil
import subprocess
import time
import uuid

import pytest

from tests.helpers import ROOT, free_port


def _missing() -> str | None:
    for tool in ("kind", "docker", "kubectl"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    r = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if r.returncode != 0:
        return "no Docker engine is running (docker info failed)"
    if os.environ.get("CAPTIONER_KIND_E2E") != "1":
        return "set CAPTIONER_KIND_E2E=1 to run the kind cluster test (pulls images, takes ~20 min)"
    return None


pytestmark = [pytest.mark.kind, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]

OPERATOR = "github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=v1.9.0"


def sh(*cmd, check=True, timeout=1800, **kw):
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check, timeout=timeout, text=True, capture_output=True, **kw)


@pytest.fixture(scope="module")
def cluster():
    name = f"captioner-{uuid.uuid4().hex[:6]}"
    sh("kind", "create", "cluster", "--name", name, "--wait", "180s")
    ctx = f"kind-{name}"
    try:
        for tag, dockerfile in (("captioner-trainer:dev", "docker/trainer.Dockerfile"),
                                ("captioner-triton:dev", "docker/triton.Dockerfile")):
            sh("docker", "build", "-f", dockerfile, "-t", tag, ".", cwd=ROOT)
            sh("kind", "load", "docker-image", tag, "--name", name)
        sh("kubectl", "--context", ctx, "apply", "--server-side", "-k", OPERATOR)
        sh("kubectl", "--context", ctx, "-n", "kubeflow", "wait", "--for=condition=Available",
           "deployment/training-operator", "--timeout=300s")
        # per-install credentials and Triton's model-repository key (rendered as Secrets by the overlay)
        sh("sh", str(ROOT / "k8s" / "base" / "secrets" / "generate.sh"))
        sh("kubectl", "--context", ctx, "create", "namespace", "kubeflow", check=False)  # the steps' Secrets go there
        sh("kubectl", "--context", ctx, "apply", "-k", str(ROOT / "k8s" / "overlays" / "kind"))
        sh("kubectl", "--context", ctx, "-n", "captioner", "rollout", "status", "statefulset/minio", "--timeout=300s")
        sh("kubectl", "--context", ctx, "-n", "captioner", "wait", "--for=condition=complete", "job/minio-users",
           "--timeout=300s")
        yield ctx
    finally:
        sh("kind", "delete", "cluster", "--name", name, check=False)


def _port_forward(ctx, target, remote):
    port = free_port()
    p = subprocess.Popen(["kubectl", "--context", ctx, "-n", "captioner", "port-forward", target, f"{port}:{remote}"])
    time.sleep(3)
    return p, port


def test_tiny_pytorchjob_then_triton_captions(cluster, tmp_path):
    from captioner.cluster.jobs import KubeApi, launch_and_wait, training_job
    from captioner.data.ingest import IngestOptions, ingest
    from captioner.data.synthetic import generate
    from captioner.serving.client import caption_bytes, wait_ready

    ctx = cluster
    pf, port = _port_forward(ctx, "svc/minio", 9000)
    try:
        keys = dict(ln.split("=", 1) for ln in (ROOT / "k8s" / "base" / "secrets" / "pipeline.env").read_text().split())
        os.environ.update({"CAPTIONER_S3_ENDPOINT": f"127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": keys["access-key"],
                           "AWS_SECRET_ACCESS_KEY": keys["secret-key"]})  # the pipeline steps' MinIO user
        src = generate(tmp_path / "src", images=120, seed=0, side=64, progress=False)
        ingest(str(src), "s3://datasets/synth/v1", IngestOptions(shard_mb=1, progress=False))
        job = training_job("captioner-e2e", "tiny-cpu", ["--data.source=s3://datasets/synth/v1", "--data.num_workers=0",
                                                         "--train.epochs=2"], "s3://models/runs/e2e",
                           image="captioner-trainer:dev", workers=2, gpus_per_worker=0, cloud="kind", cpu="1",
                           memory="2Gi", shm_size="256Mi")
        os.environ["KUBECONFIG"] = os.environ.get("KUBECONFIG", os.path.expanduser("~/.kube/config"))
        launch_and_wait(KubeApi(), job, timeout_s=1800, poll_s=10)
        from captioner.pipeline.steps import deploy_step, export_step

        export_step("s3://models/runs/e2e/ckpt_best.pt", "s3://models/repos/e2e", device="cpu")
        deploy_step("s3://models/repos/e2e", "s3://models/serving", 0.0)
        sh("kubectl", "--context", ctx, "-n", "captioner", "rollout", "restart", "deployment/triton")
        sh("kubectl", "--context", ctx, "-n", "captioner", "rollout", "status", "deployment/triton", "--timeout=600s")
        tp, tport = _port_forward(ctx, "svc/triton", 8001)
        try:
            wait_ready(f"127.0.0.1:{tport}", timeout=300)
            img = sorted((src / "flickr30k_images").glob("*.jpg"))[0].read_bytes()
            assert caption_bytes(f"127.0.0.1:{tport}", [img])[0]
        finally:
            tp.terminate()
    finally:
        pf.terminate()
