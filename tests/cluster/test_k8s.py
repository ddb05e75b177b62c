"""Kubernetes manifests: every overlay renders and validates strictly; the Dockerfiles pass hadolint."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.manifests import OVERLAYS, k8s_version, render
from tests.helpers import ROOT


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_validate_strictly(overlay):
    import kubernetes_validate

    docs = render(overlay)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for want in [("Namespace", "captioner"), ("StatefulSet", "minio"), ("Service", "minio"), ("Secret", "captioner-s3"),
                 ("Secret", "minio-root"), ("Secret", "captioner-trainer-s3"), ("Secret", "captioner-triton-s3"),
                 ("Job", "minio-users"),
                 ("Deployment", "triton"), ("Service", "triton"), ("HorizontalPodAutoscaler", "triton"),
                 ("PodDisruptionBudget", "triton"), ("NetworkPolicy", "minio-ingress"), ("Role", "captioner-pytorchjobs"),
                 ("RoleBinding", "captioner-pipeline-steps"), ("ServiceAccount", "captioner-trainer")]:
        assert want in kinds, want
    version = k8s_version()
    for d in docs:
        kubernetes_validate.validate(d, version, strict=True)
        if d["kind"] == "Secret" and d["metadata"].get("namespace") != "captioner":  # where the KFP steps run
            assert d["metadata"]["name"] in ("captioner-s3", "captioner-triton-control")
            assert d["metadata"].get("namespace") in ("kubeflow", "kubeflow-user-example-com")
        elif d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "captioner", d["metadata"]["name"]
    triton = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "triton")
    c = triton["spec"]["template"]["spec"]["containers"][0]
    assert "--model-control-mode=explicit" in c["args"]
    assert any(a.startswith("--model-repository=s3://") for a in c["args"])
    assert {p["containerPort"] for p in c["ports"]} == {8000, 8001, 8002}
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "limits" in c["resources"]
    gpus = c["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == "1") == (overlay in ("gpu-a100", "multi-user-example"))
    minio = next(d for d in docs if d["kind"] == "StatefulSet")
    assert "@sha256:" in minio["spec"]["template"]["spec"]["containers"][0]["image"]
    role = next(d for d in docs if d["kind"] == "Role")
    assert any("pytorchjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])


def test_strict_validation_rejects_unknown_fields():
    import kubernetes_validate

    d = next(x for x in render("kind") if x["kind"] == "Deployment")
    d["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(d, k8s_version(), strict=True)


def test_dockerfiles_pass_hadolint():
    exe = Path(sys.executable).with_name("hadolint")
    files = sorted((ROOT / "docker").glob("*.Dockerfile"))
    assert {f.name for f in files} >= {"trainer.Dockerfile", "triton.Dockerfile", "web.Dockerfile"}
    r = subprocess.run([str(exe), *map(str, files)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
