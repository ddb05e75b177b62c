"""The Triton side of k8s/ read against Triton's rules and Kubernetes' semantics: what is
loaded in explicit mode, the restricted control API, the HPA's metric source, the PDB, the
default-deny NetworkPolicies, and the pinned release."""
import ipaddress
import re

import pytest
import yaml

from captioner.core import deployment

from captioner.core import names

from captioner.serving import triton_repo
from tests.helpers import ROOT
from tests.cluster.test_k8s import OVERLAYS, render


def _triton(docs):
    return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "triton")


def _args(docs):
    return _triton(docs)["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_explicit_mode_loads_what_serves_a_caption(overlay, exported_repo):
    """Defect 2: a model reached through BLS is never loaded by the ensemble; since issue 13 the
    decode loop makes no BLS call, so the ensemble alone must be enough."""
    args = _args(render(overlay))
    assert "--model-control-mode=explicit" in args
    loads = [a.split("=", 1)[1] for a in args if a.startswith("--load-model=")]
    assert loads == list(triton_repo.LOAD_ORDER)
    keys, read = triton_repo.listing_from_dir(exported_repo[0])
    triton_repo.plan_load(triton_repo.load_listing(keys, read), loads, read)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_repository_protocol_is_restricted_by_the_secret_key(overlay):
    """Defect 4: without a restriction any pod reaching 8000/8001 can load or unload models."""
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
    """Defect 6: nothing provided custom.metrics.k8s.io for the HPA's metric."""
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
    """Defect 7: minAvailable: 1 with one replica allows zero evictions."""
    pdb = next(d for d in render(overlay) if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == "triton")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}


def _selects(sel: dict, labels: dict) -> bool:
    for k, v in sel.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions", []):
        if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
            return False
    return True


def _allowed(policies, direction, pod, peer, port, peer_ns="captioner", peer_ns_labels=None):
    """Kubernetes NetworkPolicy semantics, for one namespace: a flow is allowed when some
    policy selecting `pod` for `direction` has a rule whose peers and ports match; a pod no
    policy selects for that direction is unrestricted (here default-deny selects every pod)."""
    ns_labels = {"kubernetes.io/metadata.name": peer_ns, **(peer_ns_labels or {})}
    key = "ingress" if direction == "Ingress" else "egress"
    peers_key = "from" if key == "ingress" else "to"
    selecting = [p for p in policies if direction in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod)]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get(key, []):
            ports = rule.get("ports")
            if ports and not any(x.get("port") == port for x in ports):
                continue
            peers = rule.get(peers_key)
            if not peers:
                return True
            for pe in peers:
                if "ipBlock" in pe:
                    continue
                ns_ok = _selects(pe["namespaceSelector"], ns_labels) if "namespaceSelector" in pe else peer_ns == "captioner"
                pod_ok = _selects(pe["podSelector"], peer) if "podSelector" in pe else True
                if ns_ok and pod_ok:
                    return True
    return False


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
    assert _allowed(pols, direction, pod, peer, port, peer_ns) is allowed


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
