"""Kubernetes manifests, the PyTorchJob builder and launcher, the cost guard, Dockerfiles."""
import copy
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from captioner.cluster.jobs import ApiConflict, CostLimitExceeded, JobFailed, JobTimeout, check_cost, launch_and_wait
from captioner.cluster.jobspec import CLOUD_POOLS, JobSpec, job_name
from captioner.cluster.pytorchjob import build_pytorchjob, webhook_errors
from captioner.core.cost import estimate_cost
from tests.conftest import ROOT
from tests.helpers import Clock

CRD_NAME = "kubeflow.org_pytorchjobs.v1.9.0.yaml"
SHARED_CRD = ROOT.parent / "shared" / "schemas" / CRD_NAME
VENDORED_CRD = ROOT / "k8s" / "crds" / CRD_NAME
CRD = SHARED_CRD if SHARED_CRD.exists() else VENDORED_CRD
K8S = ROOT / "k8s"
# the kserve overlays replace the Triton Deployment: tests/cluster/test_kserve.py renders and checks them
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml") if "kserve" not in p.parent.name)
ALL_OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))


def _k8s_version() -> str:
    import kubernetes_validate

    d = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    vs = sorted((tuple(int(x) for x in p.name[1:].split("-")[0].split(".")) for p in d.glob("v*-local-strict")))
    return ".".join(map(str, vs[-1]))


_RENDER_CACHE: dict = {}


def render(overlay: str) -> list[dict]:
    """`kubectl kustomize` of an overlay, from a copy of k8s/ whose credentials were made by
    k8s/base/secrets/generate.sh (as an install does; none are committed)."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl (with built-in kustomize) is not installed: cannot render the overlays")
    if overlay not in _RENDER_CACHE:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="captioner-k8s-"))
        shutil.copytree(K8S, tmp / "k8s", ignore=shutil.ignore_patterns("*.env"))
        for script in ("base/secrets/generate.sh", "overlays/kserve/secrets/generate.sh"):  # as an install does
            if (tmp / "k8s" / script).exists():
                subprocess.run(["sh", str(tmp / "k8s" / script)], check=True, capture_output=True)
        r = subprocess.run([kubectl, "kustomize", str(tmp / "k8s" / "overlays" / overlay)], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        _RENDER_CACHE[overlay] = r.stdout
        shutil.rmtree(tmp)
    return [d for d in yaml.safe_load_all(_RENDER_CACHE[overlay]) if d]


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
    version = _k8s_version()
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
        kubernetes_validate.validate(d, _k8s_version(), strict=True)


# ------------------------------------------------------------------ PyTorchJob
def _strict(schema):
    """The CRD's openAPIV3Schema as JSON Schema that rejects unknown fields."""
    if isinstance(schema, dict):
        s = {k: _strict(v) for k, v in schema.items()}
        if s.get("type") == "object" and "properties" in s and "additionalProperties" not in s \
                and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        if s.get("x-kubernetes-int-or-string"):
            s.pop("type", None)
            s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return s
    if isinstance(schema, list):
        return [_strict(x) for x in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validator():
    crd = yaml.safe_load(CRD.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(_strict(schema))


def _check(job, validator):
    errors = sorted(validator.iter_errors(job), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors][:5]
    assert webhook_errors(job) == []


SPECS = [
    JobSpec(name="captioner-train-a1b2"),
    JobSpec(name="tiny", workers=1, min_workers=1, max_workers=1, gpus_per_worker=0, nproc_per_node="2",
            pool=CLOUD_POOLS["kind"], cpu="1", memory="2Gi", shm_size="256Mi"),
    JobSpec(name="eks-run", workers=4, max_workers=8, pool=CLOUD_POOLS["eks"], args=["--config", "vit-b16-a100"]),
    JobSpec(name="aks-run", workers=2, pool=CLOUD_POOLS["aks"], gpus_per_worker=4, nproc_per_node="4"),
]


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_builder_output_validates_against_crd_and_webhook(spec, crd_validator):
    job = build_pytorchjob(spec)
    _check(job, crd_validator)
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["name"] == "pytorch" and job["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] == "OnFailure"
    assert isinstance(job["spec"]["nprocPerNode"], str)
    assert job["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d"
    assert {v["name"] for v in pod["volumes"]} == {"dshm", "tmp", "workspace"}  # writable dirs; the root fs is read-only
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"
    assert all("secretKeyRef" in e["valueFrom"] for e in c["env"] if e["name"].startswith(("AWS_", "CAPTIONER_S3")))
    rp = job["spec"]["runPolicy"]
    assert rp["ttlSecondsAfterFinished"] > 0 and rp["activeDeadlineSeconds"] > 0
    if spec.gpus_per_worker:
        assert c["resources"]["limits"]["nvidia.com/gpu"] == str(spec.gpus_per_worker)
        assert pod["nodeSelector"] and pod["tolerations"]


def test_vendored_crd_is_the_shared_one():
    if not SHARED_CRD.exists():
        pytest.skip(f"{SHARED_CRD} is not beside this checkout; using the vendored copy")
    assert VENDORED_CRD.read_bytes() == SHARED_CRD.read_bytes()


def test_template_validates(crd_validator):
    _check(yaml.safe_load((K8S / "pytorchjob-template.yaml").read_text()), crd_validator)


def test_crd_and_webhook_reject_bad_jobs(crd_validator):
    job = build_pytorchjob(SPECS[0])
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["gpus"] = 8
    assert list(crd_validator.iter_errors(bad)), "unknown field must be rejected"
    bad = copy.deepcopy(job)
    bad["spec"]["elasticPolicy"]["rdzvBackendd"] = "c10d"
    assert list(crd_validator.iter_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["nprocPerNode"] = 8
    assert list(crd_validator.iter_errors(bad))
    bad = copy.deepcopy(job)
    bad["metadata"]["name"] = "Train_Job"
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    bad["spec"]["elasticPolicy"].update(minReplicas=5, maxReplicas=3)
    errs = webhook_errors(bad)
    assert any("DNS-1035" in e for e in errs) and any("'pytorch'" in e for e in errs)
    assert any("minReplicas 5 > maxReplicas 3" in e for e in errs)
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"] = {"Master": bad["spec"]["pytorchReplicaSpecs"]["Worker"]}
    assert any("elasticPolicy needs a Worker" in e for e in webhook_errors(bad))


def test_job_name_is_deterministic_dns1035():
    a, b = job_name("Captioner Train!", "run-123"), job_name("Captioner Train!", "run-123")
    assert a == b and a != job_name("Captioner Train!", "run-124")
    assert webhook_errors(build_pytorchjob(JobSpec(name=job_name("9lives", "x")))) == []


# ------------------------------------------------------------------ launcher state machine
class FakeApi:
    def __init__(self, states, conflict=False, logs=None):
        self.states, self.conflict, self.logs = list(states), conflict, list(logs or [])
        self.created, self.deleted, self.gets = [], [], 0

    def create(self, ns, body):
        if self.conflict:
            raise ApiConflict("409 AlreadyExists")
        self.created.append(body)
        return body

    def get(self, ns, name):
        self.gets += 1
        st = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        conds = [] if st is None else [{"type": st[0], "status": "True", "reason": st[1], "message": st[2]}]
        return {"metadata": {"name": name}, "status": {"conditions": conds}}

    def delete(self, ns, name):
        self.deleted.append(name)

    def master_logs(self, ns, name, since):
        return self.logs.pop(0) if len(self.logs) > 1 else (self.logs[0] if self.logs else "")


JOB = build_pytorchjob(JobSpec(name="captioner-train-x"))


def test_launcher_succeeds_and_streams_logs():
    api, clock, got = FakeApi([None, ("Running", "", ""), ("Succeeded", "Done", "")],
                              logs=["", "step 1\n", "step 1\nstep 2\n"]), Clock(), []
    launch_and_wait(api, JOB, poll_s=5, on_log=got.append, clock=clock, sleep=clock.sleep)
    assert len(api.created) == 1 and api.deleted == ["captioner-train-x"]
    assert "".join(got) == "step 1\nstep 2\n"


def test_launcher_failed_with_reason():
    api, clock = FakeApi([("Running", "", ""), ("Failed", "BackoffLimitExceeded", "worker-0 OOMKilled")]), Clock()
    with pytest.raises(JobFailed, match="BackoffLimitExceeded: worker-0 OOMKilled"):
        launch_and_wait(api, JOB, poll_s=5, on_log=lambda t: None, clock=clock, sleep=clock.sleep)
    assert api.deleted == ["captioner-train-x"]


def test_launcher_timeout_deletes_the_job():
    api, clock = FakeApi([("Running", "", "")]), Clock()
    with pytest.raises(JobTimeout, match="still Running after 60s"):
        launch_and_wait(api, JOB, timeout_s=60, poll_s=10, on_log=lambda t: None, clock=clock, sleep=clock.sleep)
    assert api.deleted == ["captioner-train-x"] and clock.t >= 60


def test_launcher_reattaches_on_409():
    api, clock = FakeApi([("Running", "", ""), ("Succeeded", "", "")], conflict=True), Clock()
    launch_and_wait(api, JOB, poll_s=1, on_log=lambda t: None, clock=clock, sleep=clock.sleep, delete_after=False)
    assert api.created == [] and api.gets == 2 and api.deleted == []


def test_launcher_refuses_invalid_job():
    bad = copy.deepcopy(JOB)
    bad["metadata"]["name"] = "Bad_Name"
    with pytest.raises(ValueError, match="would be rejected"):
        launch_and_wait(FakeApi([None]), bad)


def test_cost_guard():
    est = estimate_cost(pairs_per_epoch=145_000, epochs=20, pairs_per_s_per_gpu=1000, gpus=16, price_per_gpu_hour=3.0)
    # 145k * 20 / (1000 * 16 * 0.9) s = 201.4 s = 0.0559 h; x16 GPUs = 0.895 GPU-h; x $3
    assert est.hours == pytest.approx(0.05594, rel=1e-3) and est.cost == pytest.approx(2.685, rel=1e-3)
    check_cost(est, max_cost=10)
    with pytest.raises(CostLimitExceeded, match=r"exceeds max_cost \$1.00"):
        check_cost(est, max_cost=1.0)
    check_cost(est, max_cost=1.0, override=True)


def test_dockerfiles_pass_hadolint():
    exe = Path(sys.executable).with_name("hadolint")
    files = sorted((ROOT / "docker").glob("*.Dockerfile"))
    assert {f.name for f in files} >= {"trainer.Dockerfile", "triton.Dockerfile", "web.Dockerfile"}
    r = subprocess.run([str(exe), *map(str, files)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
