"""Admission webhooks, not only schemas: Kubeflow Trainer v2.3.0's TrainJob webhook
(tests/cluster/trainer_contract.py webhook_errors) and Training Operator v1.9.0's PyTorchJob webhook
(tests/cluster/operator_contract.py webhook_errors), ported from their Go sources, run on everything
`captioner job render` prints."""
import copy

import pytest
import yaml

from tests.cluster import operator_contract, trainer_contract
from tests.cluster.crd_schemas import TORCH_RUNTIME, load

RUNTIMES = {"torch-distributed": load(TORCH_RUNTIME)}  # what Trainer v2.3.0 installs
BASE = ["--config", "vit-b16-a100", "--data", "s3://datasets/flickr30k/v1", "--model-uri", "s3://models/runs/r1"]
RENDERS = [
    ["--api", "pytorchjob", "--nodes", "2", "--gpus-per-node", "8", "--min-nodes", "1", "--max-nodes", "4"],
    ["--api", "pytorchjob", "--nodes", "1", "--gpus-per-node", "0", "--cloud", "kind", "--train.max_steps=5"],
    ["--api", "trainjob", "--nodes", "2", "--gpus-per-node", "8"],
    ["--api", "trainjob", "--nodes", "4", "--gpus-per-node", "4", "--cloud", "aks"],
    ["--api", "trainjob", "--nodes", "1", "--gpus-per-node", "0", "--cloud", "kind", "--name", "tj-cpu"],
]


def _render(capsys, args):
    from captioner.cli.main import main

    capsys.readouterr()
    main(["job", "render", *BASE, *args])
    return yaml.safe_load(capsys.readouterr().out)


def _errors(job):
    if job["kind"] == "TrainJob":
        return trainer_contract.webhook_errors(job, RUNTIMES)
    return operator_contract.webhook_errors(job)


@pytest.mark.parametrize("args", RENDERS, ids=lambda a: "-".join(a[1:4:2]) + "-" + a[5])
def test_job_render_output_passes_the_webhook(capsys, args):
    job = _render(capsys, args)
    assert job["kind"] == {"pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}[args[1]]
    assert _errors(job) == [], f"{job['kind']} {job['metadata']['name']} would be refused at admission"


def test_trainjob_webhook_refuses_what_v230_refuses(capsys):
    """Each rule of the port fails on the input its Go function refuses (so the check above can fail)."""
    job = _render(capsys, RENDERS[2])
    patch = job["spec"]["runtimePatches"][0]
    cases = {
        "manager": lambda j: j["spec"]["runtimePatches"][0].update(manager="captioner"),
        "manager host": lambda j: j["spec"]["runtimePatches"][0].update(manager="Captioner_/x"),
        "replicated job": lambda j: j["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
            "replicatedJobs"][0].update(name="launcher"),
        "container": lambda j: _pod(j)["containers"].append({"name": "sidecar"}),
        "node env": lambda j: _pod(j)["containers"][0].update(env=[{"name": "A", "value": "1"}]),
        "reserved env": lambda j: j["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "3"}),
        "runtime": lambda j: j["spec"]["runtimeRef"].update(name="torch-elastic"),
        "initializer": lambda j: j["spec"].update(initializer={"dataset": {"storageUri": "hf://x"}}),
    }
    assert patch["manager"] != "captioner"
    for what, spoil in cases.items():
        bad = copy.deepcopy(job)
        spoil(bad)
        assert trainer_contract.webhook_errors(bad, RUNTIMES), f"{what}: the port accepts what v2.3.0 refuses"
    assert trainer_contract.is_domain_prefixed_path("captioner.dev/launcher") == []
    assert trainer_contract.is_domain_prefixed_path("captioner")  # the manager every TrainJob had before


def _pod(job):
    return job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]


def test_pytorchjob_webhook_refuses_what_v190_refuses(capsys):
    job = _render(capsys, RENDERS[0])
    w = lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]  # noqa: E731
    cases = {
        "name": lambda j: j["metadata"].update(name="9-bad"),
        "managedBy": lambda j: j["spec"]["runPolicy"].update(managedBy="me/x"),
        "nProcPerNode": lambda j: j["spec"]["elasticPolicy"].update(nProcPerNode=8),
        "no worker": lambda j: j["spec"]["pytorchReplicaSpecs"].update(Master=j["spec"]["pytorchReplicaSpecs"].pop(
            "Worker")),
        "role": lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief=copy.deepcopy(w(j))),
        "image": lambda j: w(j)["template"]["spec"]["containers"][0].pop("image"),
        "container name": lambda j: w(j)["template"]["spec"]["containers"][0].update(name="main"),
        "replicas": lambda j: w(j).update(replicas=0),
    }
    for what, spoil in cases.items():
        bad = copy.deepcopy(job)
        spoil(bad)
        assert operator_contract.webhook_errors(bad), f"{what}: the port accepts what v1.9.0 refuses"


def test_shipped_template_passes_the_webhook():
    from tests.helpers import ROOT

    job = yaml.safe_load((ROOT / "k8s" / "pytorchjob-template.yaml").read_text())
    assert operator_contract.webhook_errors(job) == []
