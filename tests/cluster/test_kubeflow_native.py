"""Kubeflow-native APIs: Trainer v2.3.0 TrainJob beside PyTorchJob (one launcher, API discovery)
and KServe v0.19.0 InferenceService. Every object is validated strictly against the vendored
CRDs (tests/cluster/crd_schemas.py)."""
import copy

import pytest
import yaml

from captioner.cluster.jobs import ApiConflict, JobFailed, JobTimeout, launch_and_wait, served_kind, training_job
from captioner.cluster.jobspec import PYTORCHJOB, TRAINJOB
from tests.cluster.crd_schemas import (RUNTIME_CRD, SERVINGRUNTIME_CRD, SHARED, TORCH_RUNTIME, TRITON_RUNTIME, VENDORED,
                                       VENDORED_FILES, errors, load, trainjob_errors)
from tests.helpers import Clock, run_cli


@pytest.mark.parametrize("name", VENDORED_FILES)
def test_vendored_schemas_are_the_shared_ones(name):
    if not (SHARED / name).exists():
        pytest.skip(f"{SHARED / name} is not beside this checkout; using the vendored copy")
    assert (VENDORED / name).read_bytes() == (SHARED / name).read_bytes()


def test_shipped_runtimes_validate_against_their_crds():
    """The runtimes as Trainer v2.3.0 / KServe v0.19.0 ship them (what our jobs and
    InferenceServices reference) validate strictly; so the validators are not vacuous."""
    assert errors(load(TORCH_RUNTIME), RUNTIME_CRD, "v1alpha1") == []
    assert errors(load(TRITON_RUNTIME), SERVINGRUNTIME_CRD, "v1alpha1") == []


# ------------------------------------------------------------------ one launcher, both kinds
class FakeCluster:
    """The API server + the kind's controller, as the launcher sees them: create returns 409
    when the name exists (re-attach), each get advances the controller one step through
    `states` (condition types as the real controllers set them: PyTorchJob Created/Running/
    Succeeded|Failed, TrainJob none while running then Complete|Failed), delete removes it.
    Every created object is validated strictly against its CRD."""

    def __init__(self, kind, states, existing=None):
        self.kind, self.states, self.objects = kind, list(states), dict(existing or {})
        self.created, self.deleted = [], []

    def create(self, ns, body):
        assert body["kind"] == self.kind.kind
        if self.kind is TRAINJOB:
            assert trainjob_errors(body) == []
        else:
            assert errors(body, "kubeflow.org_pytorchjobs.v1.9.0.yaml", "v1") == []
        if (ns, body["metadata"]["name"]) in self.objects:
            raise ApiConflict("409 AlreadyExists")
        self.objects[(ns, body["metadata"]["name"])] = copy.deepcopy(body)
        self.created.append(body["metadata"]["name"])
        return body

    def get(self, ns, name):
        obj = copy.deepcopy(self.objects[(ns, name)])
        st = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        obj["status"] = {"conditions": [{"type": t, "status": "True", "reason": r, "message": m} for t, r, m in st]}
        return obj

    def delete(self, ns, name):
        del self.objects[(ns, name)]
        self.deleted.append(name)

    def master_logs(self, ns, name, since):
        return ""


PTJ = training_job("captioner-train-x", "tiny-cpu", [], "s3://models/runs/x", workers=2, gpus_per_worker=1)
TJ = training_job("captioner-train-x", "tiny-cpu", [], "s3://models/runs/x", workers=2, gpus_per_worker=1,
                  api="trainjob")
# (job, kind, the states the controller goes through to success / to failure)
RUNS = {
    "pytorchjob": (PTJ, PYTORCHJOB, [[("Created", "", "")], [("Created", "", ""), ("Running", "", "")],
                                     [("Created", "", ""), ("Succeeded", "PyTorchJobSucceeded", "")]],
                   ("Failed", "PyTorchJobFailed", "worker-0 OOMKilled")),
    # TrainJob v2.3.0: no Running condition; Complete/Failed copied from the JobSet
    "trainjob": (TJ, TRAINJOB, [[], [], [("Complete", "JobSetCompleted", "jobset completed")]],
                 ("Failed", "FailedJobs", "jobset failed: node-0 OOMKilled")),
}


def _run(cluster, job, **kw):
    clock = Clock()
    return launch_and_wait(cluster, job, poll_s=5, on_log=lambda t: None, clock=clock, sleep=clock.sleep, **kw), clock


@pytest.mark.parametrize("api", RUNS)
def test_launcher_runs_each_kind_to_its_done_condition(api):
    job, kind, ok, _ = RUNS[api]
    c = FakeCluster(kind, ok)
    done, _ = _run(c, job)
    assert c.created == ["captioner-train-x"] and c.deleted == ["captioner-train-x"]
    assert done["status"]["conditions"][-1]["type"] == kind.done


@pytest.mark.parametrize("api", RUNS)
def test_launcher_reports_failure_with_the_reason(api):
    job, kind, _, failed = RUNS[api]
    c = FakeCluster(kind, [[], [failed]])
    with pytest.raises(JobFailed, match=failed[1]):
        _run(c, job)
    assert c.deleted == ["captioner-train-x"]


@pytest.mark.parametrize("api", RUNS)
def test_launcher_reattaches_on_409_and_times_out(api):
    job, kind, ok, _ = RUNS[api]
    c = FakeCluster(kind, ok, existing={("captioner", "captioner-train-x"): copy.deepcopy(job)})
    _run(c, job, delete_after=False)
    assert c.created == [] and c.deleted == [], "a retry re-attaches to the running job and leaves it"
    c = FakeCluster(kind, [[]])
    with pytest.raises(JobTimeout, match="still Pending after 60s"):
        _run(c, job, timeout_s=60)
    assert c.deleted == ["captioner-train-x"], "a job we stop following is deleted"


def test_a_trainjob_never_succeeds_on_the_pytorchjob_condition():
    """The TrainJob controller never sets `Succeeded`: waiting for it would hang until the timeout."""
    c = FakeCluster(TRAINJOB, [[("Succeeded", "", "")]])
    with pytest.raises(JobTimeout):
        _run(c, TJ, timeout_s=30)


# API discovery: the APIResourceList each install serves (`kubectl get --raw /apis/<g>/<v>`)
DISCOVERY = {
    "/apis/kubeflow.org/v1": {"kind": "APIResourceList", "groupVersion": "kubeflow.org/v1", "resources": [
        {"name": "pytorchjobs", "singularName": "pytorchjob", "namespaced": True, "kind": "PyTorchJob"},
        {"name": "pytorchjobs/status", "namespaced": True, "kind": "PyTorchJob"}]},
    "/apis/trainer.kubeflow.org/v1alpha1": {"kind": "APIResourceList", "groupVersion": "trainer.kubeflow.org/v1alpha1",
                                            "resources": [
        {"name": "clustertrainingruntimes", "namespaced": False, "kind": "ClusterTrainingRuntime"},
        {"name": "trainjobs", "singularName": "trainjob", "namespaced": True, "kind": "TrainJob"},
        {"name": "trainingruntimes", "namespaced": True, "kind": "TrainingRuntime"}]},
}


def _served(*paths):
    return lambda p: DISCOVERY[p] if p in paths else None


@pytest.mark.parametrize("choice, served, want", [
    ("auto", ["/apis/kubeflow.org/v1"], PYTORCHJOB),
    ("auto", ["/apis/trainer.kubeflow.org/v1alpha1"], TRAINJOB),
    ("auto", list(DISCOVERY), TRAINJOB),
    ("pytorchjob", list(DISCOVERY), PYTORCHJOB),
    ("trainjob", ["/apis/trainer.kubeflow.org/v1alpha1"], TRAINJOB),
])
def test_api_discovery_picks_the_served_kind(choice, served, want):
    assert served_kind(choice, _served(*served)) is want


@pytest.mark.parametrize("choice, served, msg", [
    ("auto", [], "serves no TrainJob"), ("trainjob", ["/apis/kubeflow.org/v1"], "serves no TrainJob"),
    ("tfjob", list(DISCOVERY), "one of pytorchjob, trainjob, auto")])
def test_api_discovery_refuses_clearly(choice, served, msg):
    with pytest.raises((RuntimeError, ValueError), match=msg):
        served_kind(choice, _served(*served))


def test_job_render_trainjob_is_the_pipeline_job():
    r = run_cli("job", "render", "--api", "trainjob", "--config", "vit-b16-a100", "--nodes", "2", "--gpus-per-node", "8",
                "--data", "s3://datasets/flickr30k/v1", "--model-uri", "s3://models/runs/manual", "--name",
                "captioner-train-m")
    assert r.returncode == 0, r.stderr
    job = yaml.safe_load(r.stdout)
    assert trainjob_errors(job) == []
    assert job == training_job("captioner-train-m", "vit-b16-a100", ["--data.source=s3://datasets/flickr30k/v1"],
                               "s3://models/runs/manual", workers=2, gpus_per_worker=8, api="trainjob")
    r = run_cli("job", "render", "--api", "trainjob", "--config", "vit-b16-a100", "--nodes", "2", "--gpus-per-node", "8",
                "--data", "s3://datasets/x", "--model-uri", "s3://models/runs/m", "--max-nodes", "4")
    assert r.returncode != 0 and "no elastic training" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def ingested(synth_dir, tmp_path_factory):
    from captioner.pipeline.steps import ingest_step

    d = tmp_path_factory.mktemp("ingested") / "data"
    ingest_step(str(synth_dir), str(d))
    return d


@pytest.mark.parametrize("choice, served, kind", [("auto", ["/apis/trainer.kubeflow.org/v1alpha1"], "TrainJob"),
                                                  ("auto", ["/apis/kubeflow.org/v1"], "PyTorchJob"),
                                                  ("pytorchjob", list(DISCOVERY), "PyTorchJob")])
def test_pipeline_cluster_mode_launches_the_chosen_api(ingested, tmp_path, monkeypatch, choice, served, kind):
    """train_step(mode=cluster) with --train.api: discovery picks the kind, the job the
    pipeline builds is created through the shared launcher and followed to its done state."""
    import captioner.cluster.jobs as kj
    from captioner.pipeline.steps import train_step

    made = {}

    def api(k=None):
        if k is None:
            return type("Discovery", (), {"discover": staticmethod(_served(*served))})()
        made[k.kind] = FakeCluster(k, [[], [(k.done, "Done", "")]])
        return made[k.kind]

    monkeypatch.setattr(kj, "KubeApi", api)
    r = train_step(str(ingested), "s3://models/runs/p", "tiny-cpu", [f"--train.api={choice}"], mode="cluster",
                   run_id="run-7", cluster={"workers": 2, "gpus_per_worker": 1})
    assert r["kind"] == kind and list(made) == [kind] and made[kind].created == [r["job"]]


def test_pipeline_cluster_mode_refuses_an_api_the_cluster_lacks(ingested, monkeypatch):
    import captioner.cluster.jobs as kj
    from captioner.pipeline.steps import train_step

    monkeypatch.setattr(kj, "KubeApi", lambda k=None: type("D", (), {"discover": staticmethod(_served())})())
    with pytest.raises(RuntimeError, match=r"serves no PyTorchJob \(kubeflow.org/v1\)"):
        train_step(str(ingested), "s3://models/runs/p", "tiny-cpu", ["--train.api=pytorchjob"], mode="cluster",
                   run_id="run-7", cluster={"workers": 2, "gpus_per_worker": 1})
