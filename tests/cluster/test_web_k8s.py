"""The web gateway's manifests (k8s/base/web.yaml + overlays) read with Kubernetes' semantics:
probes on the real routes, non-root, limits, HPA on CPU, Ingress host/TLS per overlay, and
NetworkPolicies that let the gateway reach only Triton's gRPC inference port."""
import os
import subprocess
import sys

import pytest

from tests.cluster.cluster_integrity import policy_allows
from tests.cluster.manifests import OVERLAYS, render
from tests.helpers import ROOT

WEB = {"app.kubernetes.io/name": "captioner-web", "captioner/triton-client": "true"}
TRITON = {"app.kubernetes.io/name": "triton"}
MINIO = {"app.kubernetes.io/name": "minio"}
PROM = {"app.kubernetes.io/name": "prometheus"}
OTHER = {"app": "something-else"}


def _get(docs, kind, name="captioner-web"):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert found, f"{kind}/{name} missing"
    return found[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_deployment(overlay):
    import kubernetes_validate

    from tests.cluster.manifests import k8s_version

    docs = render(overlay)
    dep = _get(docs, "Deployment")
    for kind in ("Deployment", "Service", "Ingress", "HorizontalPodAutoscaler", "NetworkPolicy",
                 "PodDisruptionBudget"):
        kubernetes_validate.validate(_get(docs, kind), k8s_version(), strict=True)
    pod = dep["spec"]["template"]
    assert pod["metadata"]["labels"] == WEB  # the label Triton's ingress policy admits
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
    (c,) = spec["containers"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False and c["securityContext"]["readOnlyRootFilesystem"]
    assert {"cpu", "memory"} <= set(c["resources"]["limits"]) and "cpu" in c["resources"]["requests"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["readinessProbe"]["httpGet"]["port"] in ports
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    args = c["args"]
    host, port = args[args.index("--url") + 1].split(":")
    svc = _get(docs, "Service", host.split(".")[0])  # --url names Triton's Service and its gRPC port
    assert host.split(".")[1] == "captioner" and int(port) in [p["port"] for p in svc["spec"]["ports"] if
                                                              p["name"] == "grpc"]
    assert int(args[args.index("--port") + 1]) == ports["http"]
    ann = pod["metadata"]["annotations"]  # scraped like Triton's pods
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == ports["http"]
    assert ann["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_hpa_and_service(overlay):
    docs = render(overlay)
    ing = _get(docs, "Ingress")
    hosts = [r["host"] for r in ing["spec"]["rules"]]
    assert hosts and hosts != ["captioner.example.com"], "each overlay sets its own host"
    assert ing["spec"]["tls"][0]["hosts"] == hosts and ing["spec"]["tls"][0]["secretName"]
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    svc = _get(docs, "Service", backend["name"])
    assert backend["port"]["name"] in [p["name"] for p in svc["spec"]["ports"]]
    hpa = _get(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "captioner-web"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]


@pytest.mark.parametrize("pod, direction, peer, peer_ns, port, allowed", [
    (WEB, "Egress", TRITON, "captioner", 8001, True),     # gRPC inference
    (WEB, "Egress", TRITON, "captioner", 8000, False),    # not Triton's HTTP port
    (WEB, "Egress", TRITON, "captioner", 8002, False),    # not its metrics
    (WEB, "Egress", MINIO, "captioner", 9000, False),     # not the model store
    (WEB, "Egress", OTHER, "captioner", 443, False),
    (TRITON, "Ingress", WEB, "captioner", 8001, True),    # Triton admits the gateway
    (WEB, "Ingress", OTHER, "ingress-nginx", 8080, True),  # the ingress controller
    (WEB, "Ingress", PROM, "monitoring", 8080, True),     # metrics
    (WEB, "Ingress", OTHER, "captioner", 8080, False),
    (WEB, "Ingress", OTHER, "apps", 8080, False),
])
def test_gateway_network_policy(pod, direction, peer, peer_ns, port, allowed):
    pols = [d for d in render(OVERLAYS[0]) if d["kind"] == "NetworkPolicy"]
    assert policy_allows(pols, direction, pod, peer, port, peer_ns) is allowed


def test_gateway_runs_without_the_training_stack():
    """docker/web.Dockerfile installs neither torch, onnxruntime nor timm: the gateway must not need them."""
    code = ("import sys\nfor m in ('torch', 'onnxruntime', 'timm', 'onnx', 'kfp'):\n    sys.modules[m] = None\n"
            "import captioner.web.gateway, captioner.cli.main\ncaptioner.web.gateway.create_app('127.0.0.1:1')\n"
            "sys.argv = ['captioner', 'web', '--help']\ncaptioner.cli.main.main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert r.returncode == 0 and "--url" in r.stdout, r.stderr
    docker = (ROOT / "docker" / "web.Dockerfile").read_text()
    for dep in ("fastapi", "uvicorn", "python-multipart", "prometheus-client", "tritonclient[grpc]"):
        assert f'"{dep}==' in docker, dep
