"""The whole install, not each object alone: for every rendered overlay (single-user and
multi-user Kubeflow, Triton Deployment and KServe), plus the pods controllers make from our
objects and the compiled pipeline's step pods, every reference resolves in the pod's own
namespace, every Service host:port resolves in the same render, and the NetworkPolicies
allow exactly the flows of tests/cluster/cluster_flows.py (tests/cluster/cluster_integrity.py)."""
import re

import pytest
import yaml

from captioner.cluster import kserve as ks
from captioner.core.deployment import KFP_STEP_NAMESPACE, KFP_STEP_SERVICE_ACCOUNT
from tests.cluster.cluster_flows import FLOWS
from tests.cluster.cluster_integrity import (_selects, applies, build_install, flow_allowed, host_ports, refs,
                                             service_refs, unused_rules)
from tests.cluster.manifests import ALL_OVERLAYS, K8S, render
from tests.helpers import ROOT

PROFILE = "kubeflow-user-example-com"  # the example profile of k8s/components/multi-user


def steps_identity(overlay):
    """Where Kubeflow Pipelines runs the steps, as whom: single-user KFP runs them as
    kubeflow/pipeline-runner; multi-user Kubeflow as default-editor in the profile namespace."""
    return (PROFILE, "default-editor") if "multi-user" in overlay else (KFP_STEP_NAMESPACE, KFP_STEP_SERVICE_ACCOUNT)


# Objects our manifests reference that something else creates, each with who creates it. A
# user-made one is named by the command that makes it, and the test checks k8s/ documents it.
EXTERNAL = {
    ("ServiceAccount", "kubeflow", "pipeline-runner"): "installed by Kubeflow Pipelines (single-user)",
    ("ServiceAccount", PROFILE, "default-editor"): "created by Kubeflow's profile controller in each profile",
    ("Secret", "captioner", "captioner-web-tls-kind"):
        "kubectl -n captioner create secret tls captioner-web-tls-kind --cert=... --key=...",
    ("Secret", "captioner", "captioner-web-tls"):
        "kubectl -n captioner create secret tls captioner-web-tls --cert=... --key=...",
}


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    """The compiled pipeline's per-task Kubernetes settings (Secrets as env)."""
    from kfp import compiler

    from captioner.pipeline.captioning import build_pipeline

    out = tmp_path_factory.mktemp("kfp") / "p.yaml"
    compiler.Compiler().compile(build_pipeline(cluster=True), str(out))
    docs = list(yaml.safe_load_all(out.read_text()))
    return next(d for d in docs if "platforms" in d)["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def training_jobs():
    """The jobs the train step launches (both APIs), as `captioner job render` prints them."""
    from captioner.cluster.jobs import training_job

    args = ("captioner-train-x", "vit-b16-a100", ["--data.source=s3://datasets/f/v1"], "s3://models/runs/r1")
    return [training_job(*args, api="pytorchjob"), training_job(*args, api="trainjob")]


def _install(overlay, platform, job):
    return build_install(render(overlay), *steps_identity(overlay), platform, job)


def test_documented_commands_are_documented():
    text = "".join(p.read_text() for p in K8S.rglob("*.yaml"))
    for what, how in EXTERNAL.items():
        if how.startswith("kubectl "):
            assert how in text, f"{what}: the command that makes it is not in k8s/"


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_every_reference_resolves_in_the_pods_namespace(overlay, platform, training_jobs):
    for job in training_jobs:
        inst = _install(overlay, platform, job)
        assert len([p for p in inst.pods if p.origin.startswith("KFP step")]) >= 6
        assert refs(inst, EXTERNAL) == []


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_every_service_host_and_port_resolves(overlay, platform, training_jobs):
    inst = _install(overlay, platform, training_jobs[0])
    assert service_refs(inst) == []


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_network_policies_allow_exactly_the_needed_flows(overlay, platform, training_jobs):
    inst = _install(overlay, platform, training_jobs[0])
    live = {f.name for f in FLOWS if applies(f, inst)}
    serving = {"activator->predictor", "gateway->predictor", "web->predictor", "predictor->minio"} \
        if "kserve" in overlay else {"step->triton", "web->triton", "triton->minio", "prometheus->triton"}
    assert serving | {"step->minio", "trainer->minio", "trainer<->trainer", "minio-setup->minio"} <= live
    denied = [e for f in FLOWS if f.name in live for e in flow_allowed(f, inst)]
    assert denied == []
    assert unused_rules(inst) == []


def test_flow_check_sees_a_denied_flow_and_an_unused_rule(platform, training_jobs):
    """The two checks above can fail: drop a rule, then add one nobody needs."""
    import copy

    inst = _install("kind", platform, training_jobs[0])
    docs = copy.deepcopy(inst.docs)
    pol = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "minio-ingress")
    pol["spec"]["ingress"][0]["from"].pop(0)  # Triton's peer
    inst.docs = docs
    assert any("triton->minio" in e for f in FLOWS for e in flow_allowed(f, inst))
    pol["spec"]["ingress"][0]["ports"].append({"port": 9001, "protocol": "TCP"})
    assert any("port 9001" in e for e in unused_rules(inst))


@pytest.mark.parametrize("overlay", [o for o in ALL_OVERLAYS if "kserve" in o])
def test_inferenceservice_runs_the_captioner_triton_image(overlay):
    """The runtime the InferenceService names resolves to a ServingRuntime in its namespace
    (or a ClusterServingRuntime KServe v0.19.0 installs, with the image its
    config/runtimes/kustomization.yaml pins) running our Triton image, the one the Triton
    Deployment runs (docker/triton.Dockerfile: the captioner package and onnxruntime on the
    pinned release)."""
    kserve_cluster_runtimes = {"kserve-tritonserver": "nvcr.io/nvidia/tritonserver:23.05-py3"}
    docs = render(overlay)
    isvc = next(d for d in docs if d["kind"] == "InferenceService")
    name, ns = isvc["spec"]["predictor"]["model"]["runtime"], isvc["metadata"]["namespace"]
    rt = next((d for d in docs if d["kind"] == "ServingRuntime" and d["metadata"]["name"] == name
               and d["metadata"]["namespace"] == ns), None)
    image = rt["spec"]["containers"][0]["image"] if rt else kserve_cluster_runtimes.get(name)
    base = yaml.safe_load_all((K8S / "base" / "triton.yaml").read_text())
    ours = next(d for d in base if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == ours, f"the predictor would run {image} (runtime {name}), not the captioner Triton image {ours}"
    from tests.cluster.crd_schemas import SERVINGRUNTIME_CRD, errors

    assert errors(rt, SERVINGRUNTIME_CRD, "v1alpha1") == []
    fmt = isvc["spec"]["predictor"]["model"]["modelFormat"]
    assert any(f["name"] == fmt["name"] and f["version"] == fmt["version"] for f in rt["spec"]["supportedModelFormats"])


def test_inferenceservice_pins_serverless_and_a_prefix_with_a_slash():
    """Canary splits and latestRolledoutRevision exist only in Serverless mode; storageUri
    must end in '/' (kserve_storage lists with Prefix=<path>)."""
    isvc = ks.build_inferenceservice(ks.IsvcSpec("s3://models/serving", 3, canary_percent=10))
    assert isvc["metadata"]["annotations"].get("serving.kserve.io/deploymentMode") == "Serverless"
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "s3://models/serving/"


def test_storage_initializer_copies_only_the_serving_prefix(s3_server, monkeypatch, tmp_path):
    """KServe v0.19.0's download (tests/record_s3_requests.kserve_download, its calls and
    target-path rule) of what the builder writes as storageUri: a sibling prefix
    serving-old/ stays out of /mnt/models."""
    import boto3

    from tests.cluster.record_s3_requests import kserve_download

    url = "http://" + s3_server["CAPTIONER_S3_ENDPOINT"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["AWS_SECRET_ACCESS_KEY"])
    s3 = boto3.session.Session().client("s3", endpoint_url=url, region_name="us-east-1")
    s3.create_bucket(Bucket="models-kserve")
    for k in ("serving/captioner/config.pbtxt", "serving-old/captioner/config.pbtxt"):
        s3.put_object(Bucket="models-kserve", Key=k, Body=b"x")
    uri = ks.build_inferenceservice(ks.IsvcSpec("s3://models-kserve/serving", 1))["spec"]["predictor"]["model"][
        "storageUri"]
    assert kserve_download(url, uri, tmp_path / "mnt") == ["captioner/config.pbtxt"]


def test_deploy_urls_name_every_triton_replica():
    """A deploy loads the new version on every replica only through the headless Service
    (one address per ready pod); a ClusterIP Service reaches one. Every --triton-url the docs
    show resolves to a headless Service over the Triton pods in the render."""
    docs = render("kind")
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs
            if d["kind"] == "Deployment"}
    urls = re.findall(r"--triton-url[ =]([^\s`'\"]+)", (ROOT / "README.md").read_text())
    assert urls, "the README shows no --triton-url"
    for url in urls:
        short = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+):(\d+)", url)  # name.namespace:port
        found = host_ports(url, "captioner")
        if short and not found:
            found = [(short.group(2), short.group(1), int(short.group(3)))]
        assert found, url
        ns, name, port = found[0]
        svc = next((d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == name), None)
        assert svc is not None and port in [p["port"] for p in svc["spec"]["ports"]], url
        assert svc["spec"].get("clusterIP") == "None", f"{url}: Service {name} has one ClusterIP: one replica loads"
        assert _selects({"matchLabels": svc["spec"]["selector"]}, pods["triton"])


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_steps_identity_may_do_its_work_in_the_job_namespace(overlay):
    """Whoever runs the steps in this install (single-user: kubeflow/pipeline-runner;
    multi-user: default-editor in the profile) may launch training jobs in `captioner` and,
    with KServe, patch the InferenceService (tests/cluster/rbac_eval.py follows the RBAC authorizer)."""
    from tests.cluster.rbac_eval import Rbac, Request, sa_user

    rbac, who = Rbac(render(overlay)), sa_user(*steps_identity(overlay))
    need = [("kubeflow.org", "pytorchjobs", "create"), ("trainer.kubeflow.org", "trainjobs", "create")]
    if "kserve" in overlay:
        need += [("serving.kserve.io", "inferenceservices", v) for v in ("get", "create", "patch")]
    for group, resource, verb in need:
        assert rbac.allowed(Request(who, verb, group, resource, "captioner")), (who, verb, resource)
