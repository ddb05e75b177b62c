"""The PyTorchJob builder (captioner/cluster/pytorchjob.py): its objects pass the Training Operator
v1.9.0 CRD with unknown fields rejected and the operator's webhook rules; bad jobs are refused."""
import copy

import pytest
import yaml

from captioner.cluster.jobspec import CLOUD_POOLS, JobSpec
from captioner.cluster.pytorchjob import build_pytorchjob, webhook_errors
from tests.cluster.crd_schemas import PYTORCHJOB_CRD, SHARED, VENDORED, check_pytorchjob
from tests.cluster.manifests import K8S

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
    check_pytorchjob(job, crd_validator)
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
    if not (SHARED / PYTORCHJOB_CRD).exists():
        pytest.skip(f"{SHARED / PYTORCHJOB_CRD} is not beside this checkout; using the vendored copy")
    assert (VENDORED / PYTORCHJOB_CRD).read_bytes() == (SHARED / PYTORCHJOB_CRD).read_bytes()


def test_template_validates(crd_validator):
    check_pytorchjob(yaml.safe_load((K8S / "pytorchjob-template.yaml").read_text()), crd_validator)


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
