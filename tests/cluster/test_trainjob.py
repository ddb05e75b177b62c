"""The TrainJob builder (captioner/cluster/trainjob.py): its objects pass the Trainer v2.3.0 CRD with
unknown fields rejected; the CRD's and the webhooks' rules refuse bad jobs."""
import copy

import pytest

from captioner.cluster.jobs import training_job
from captioner.cluster.trainjob import webhook_errors
from tests.cluster.crd_schemas import trainjob_errors


def _tj(**kw):
    args = dict(workers=2, gpus_per_worker=8)
    args.update(kw)
    return training_job("captioner-train-tj", "vit-b16-a100", ["--data.source=s3://datasets/f/v1"],
                        "s3://models/runs/r1", api="trainjob", **args)


@pytest.mark.parametrize("kw", [{}, {"gpus_per_worker": 0, "cloud": "kind", "cpu": "2"},
                                {"cloud": "eks", "workers": 4}, {"cloud": "aks", "gpus_per_worker": 4}],
                         ids=["gke", "kind-cpu", "eks", "aks"])
def test_trainjob_validates_strictly(kw):
    job = _tj(**kw)
    assert trainjob_errors(job) == []
    tr = job["spec"]["trainer"]
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed" and tr["numNodes"] == kw.get("workers", 2)
    assert tr["numProcPerNode"] == (kw.get("gpus_per_worker", 8) or 1)
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    assert bool(pod.get("nodeSelector")) == (kw.get("cloud") != "kind")
    assert all("secretKeyRef" in e["valueFrom"] for e in tr["env"] if e["name"].startswith(("AWS_", "CAPTIONER_S3")))


def test_trainjob_schema_and_rules_reject_bad_jobs():
    job = _tj()
    bad = copy.deepcopy(job)
    bad["spec"]["trainer"]["gpus"] = 8
    assert trainjob_errors(bad), "unknown field must be rejected"
    bad = copy.deepcopy(job)
    bad["spec"]["podTemplateOverrides"] = []  # a later Trainer's field, not v2.3.0's
    assert trainjob_errors(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["trainer"]["numProcPerNode"] = "auto"  # an integer in v2.3.0
    assert trainjob_errors(bad)
    with pytest.raises(ValueError, match="no elastic training"):
        _tj(min_workers=1, max_workers=4)
    bad = copy.deepcopy(job)
    bad["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "3"})
    assert any("reserved envs" in e for e in webhook_errors(bad))
