"""The Triton side of k8s/ read against Triton's rules and Kubernetes' semantics: what is
loaded in explicit mode, the restricted control API, the HPA's metric source, the PDB, the
default-deny NetworkPolicies, and the pinned release."""
import ipaddress
import re

import pytest
import yaml

from captioner.core import deployment, names
from captioner.serving import triton_repo
from tests.cluster.cluster_integrity import policy_allows
from tests.cluster.manifests import OVERLAYS, render
from tests.helpers import ROOT


def _triton(docs):
    return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "triton")


def _args(docs):
    return _triton(docs)["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_explicit_mode_loads_what_serves_a_caption(overlay, exported_repo):
    """In explicit mode Triton loads only the listed models and the ensemble's steps: a model
    reached only through BLS would never be loaded. The decode loop makes no BLS call (it runs
    the step graph itself), so the ensemble alone must be enough."""
    args = _args(render(overlay))
    assert "--model-control-mode=explicit" in args
    loads = [a.split("=", 1)[1] for a in args if a.startswith("--load-model=")]
    assert loads == list(triton_repo.LOAD_ORDER)
    keys, read = triton_repo.listing_from_dir(exported_repo[0])
    triton_repo.plan_load(triton_repo.load_listing(keys, read), loads, read)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_repository_protocol_is_restricted_by_the_secret_key(overlay):
    """Without a restriction any pod reaching 8000/8001 could load or unload models."""
    docs = render(overlay)
    c = _triton(docs)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    ref = env[deployment.CONTROL_KEY_ENV]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (deployment.CONTROL_SECRET, deployment.CONTROL_SECRET_KEY)
    want = f"model-repository:{deployment.CONTROL_HEADER}=$({deployment.CONTROL_KEY_ENV})"
    assert f"--grpc-restricted-protocol={want}" in c["args"]
    assert f"--http-restricted-api={want}" in c["args"]
    # one flag list: the container runs exactly what the real server in tests runs
    # (captioner.serving.triton_server starts tritonserver with deployment.triton_server_args too)
    assert c["args"] == ["tritonserver", *deployment.triton_server_args()]
    # the deploy step can reach every replica: a headless Service over the Triton pods
    hl = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None")
    assert hl["spec"]["selector"] == _triton(docs)["spec"]["selector"]["matchLabels"]


def test_pipeline_deploy_step_gets_the_control_key():
    text = (ROOT / "captioner" / "pipeline" / "captioning.py").read_text()
    assert "CONTROL_SECRET" in text and "CONTROL_KEY_ENV" in text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_metric_is_produced_by_the_shipped_adapter_rule(overlay):
    """The HPA scales on a custom metric: the shipped Prometheus adapter rule must produce it
    (custom.metrics.k8s.io), as a per-request rate of the cumulative counters."""
    hpa = next(d for d in render(overlay) if d["kind"] == "HorizontalPodAutoscaler" and d["metadata"]["name"] == "triton")
    rules = yaml.safe_load((ROOT / "k8s" / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    produced = {r["name"]["as"]: r for r in rules}
    for m in hpa["spec"]["metrics"]:
        assert m["type"] == "Pods"
        rule = produced[m["pods"]["metric"]["name"]]
        assert re.match(rf"{rule['name']['matches']}", "nv_inference_queue_duration_us")
        q = rule["metricsQuery"]
        # a cumulative counter must be turned into a rate, per request
        assert "rate(nv_inference_queue_duration_us" in q and "rate(nv_inference_request_success" in q


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdb_allows_a_drain_at_any_replica_count(overlay):
    """minAvailable: 1 with one replica would allow zero evictions (a node drain would hang)."""
    pdb = next(d for d in render(overlay) if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == "triton")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}


TRITON = {"app.kubernetes.io/name": "triton"}
MINIO = {"app.kubernetes.io/name": "minio"}
TRAINER = {"app.kubernetes.io/name": "captioner-trainer"}
KFP = {"pipelines.kubeflow.org/v2_component": "true"}
PROM = {"app.kubernetes.io/name": "prometheus"}
CLIENT = {"captioner/triton-client": "true"}
OTHER = {"app": "something-else"}


@pytest.mark.parametrize("pod, direction, peer, peer_ns, port, allowed", [
    (TRITON, "Ingress", PROM, "monitoring", 8002, True),       # metrics: Prometheus only
    (TRITON, "Ingress", KFP, "kubeflow", 8002, False),
    (TRITON, "Ingress", OTHER, "captioner", 8002, False),
    (TRITON, "Ingress", KFP, "kubeflow", 8001, True),           # the deploy step
    (TRITON, "Ingress", CLIENT, "apps", 8001, True),            # inference clients
    (TRITON, "Ingress", OTHER, "apps", 8001, False),
    (TRITON, "Egress", MINIO, "captioner", 9000, True),         # the model repository
    (TRITON, "Egress", OTHER, "captioner", 443, False),
    (MINIO, "Ingress", TRITON, "captioner", 9000, True),
    (MINIO, "Ingress", OTHER, "captioner", 9000, False),
    (MINIO, "Egress", OTHER, "captioner", 443, False),
    (TRAINER, "Ingress", TRAINER, "captioner", 29500, True),    # DDP rendezvous
    (TRAINER, "Egress", MINIO, "captioner", 9000, True),
    (OTHER, "Ingress", OTHER, "captioner", 80, False),          # default deny
    (OTHER, "Egress", {"k8s-app": "kube-dns"}, "kube-system", 53, True),  # DNS for everyone
])
def test_network_policies_default_deny_and_allow_exactly_the_needed_flows(pod, direction, peer, peer_ns, port,
                                                                          allowed):
    pols = [d for d in render(OVERLAYS[0]) if d["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in pols)
    assert policy_allows(pols, direction, pod, peer, port, peer_ns) is allowed


def test_trainer_internet_egress_excludes_cluster_ranges():
    pols = [d for d in render(OVERLAYS[0]) if d["kind"] == "NetworkPolicy"]
    blocks = [pe["ipBlock"] for p in pols for r in p["spec"].get("egress", []) for pe in r.get("to", []) if "ipBlock" in pe]
    for b in blocks:
        assert ipaddress.ip_network("10.0.0.0/8").with_prefixlen in b["except"]


def test_triton_release_is_pinned_in_one_place():
    docker = (ROOT / "docker" / "triton.Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", docker, re.M) == [deployment.TRITON_IMAGE]
    assert deployment.TRITON_RELEASE in deployment.TRITON_IMAGE
    assert triton_repo.LOAD_ORDER == (names.ENSEMBLE,)
