"""What Kubeflow Trainer v2.3.0 gives the training container of a TrainJob on a
ClusterTrainingRuntime, written from its source (github.com/kubeflow/trainer, tag v2.3.0):

- pkg/runtime/framework/plugins/jobset/builder.go Trainer(): for the replicatedJob labelled
  `trainer.kubeflow.org/trainjob-ancestor-step: trainer`, the container named `node` takes
  trainer.image, trainer.command and trainer.args (when set) and trainer.env is upserted into
  its env (runtime env first, TrainJob env wins by name).
- pkg/runtime/framework/plugins/torch/torch.go EnforceMLPolicy (mlPolicy.torch set, command
  not torchtune): the pod count = trainer.numNodes; then upserted into that container:
    PET_NNODES         = numNodes                        (a single number: no elastic range)
    PET_NPROC_PER_NODE = trainer.numProcPerNode, else "auto"; "auto" with no GPU in
                         resourcesPerNode -> max(1, CPU request (else limit), rounded up)
    PET_NODE_RANK      = fieldRef metadata.annotations['batch.kubernetes.io/job-completion-index']
                         (constants.JobCompletionIndexFieldPath): the pod's index 0..N-1
    PET_MASTER_ADDR    = "<trainjob>-node-0-0.<trainjob>"  (JobSet pod DNS name of node 0)
    PET_MASTER_PORT    = "29500"                         (constants.ContainerTrainerPort)
  No PET_RDZV_ENDPOINT / PET_RDZV_BACKEND: torchrun uses its default static rendezvous on
  MASTER_ADDR:MASTER_PORT with the node rank given (torch/distributed/run.py), unlike the
  Training Operator's elastic c10d (tests/operator_contract.py).
- torch.go Validate(): trainer.env must not set any of those five names.
"""
from __future__ import annotations

import math

NODE, ANCESTOR_LABEL, MASTER_PORT = "node", "trainer.kubeflow.org/trainjob-ancestor-step", 29500
RESERVED = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")


def _cpu(q) -> int:
    q = str(q)
    return math.ceil(int(q[:-1]) / 1000) if q.endswith("m") else math.ceil(float(q))  # Quantity.Value() rounds up


def trainer_container(runtime: dict) -> dict:
    """The `node` container of the replicatedJob whose ancestor label is `trainer`."""
    for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
        if rj["template"].get("metadata", {}).get("labels", {}).get(ANCESTOR_LABEL) == "trainer":
            for c in rj["template"]["spec"]["template"]["spec"]["containers"]:
                if c["name"] == NODE:
                    return c
    raise ValueError(f"runtime {runtime['metadata']['name']} has no trainer replicatedJob with a {NODE!r} container")


def check_runtime_ref(job: dict, runtime: dict) -> None:
    ref = job["spec"]["runtimeRef"]
    assert ref.get("kind", "ClusterTrainingRuntime") == runtime["kind"] and ref["name"] == runtime["metadata"]["name"]
    assert runtime["spec"]["mlPolicy"].get("torch") is not None, "the torch plugin runs only with mlPolicy.torch"
    names = {c["name"] for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]
             for c in rj["template"]["spec"]["template"]["spec"]["containers"]}
    jobs = {rj["name"] for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    for p in job["spec"].get("runtimePatches", []):
        for rj in p["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            assert rj["name"] in jobs, f"runtimePatches replicatedJob {rj['name']!r} not in the runtime ({jobs})"
            for c in rj["template"]["spec"]["template"]["spec"].get("containers", []):
                assert c["name"] in names, f"runtimePatches container {c['name']!r}: runtime must have it ({names})"


def command(job: dict, runtime: dict) -> list[str]:
    c, tr = trainer_container(runtime), job["spec"].get("trainer") or {}
    return list(tr.get("command") or c.get("command") or []) + list(tr.get("args") or c.get("args") or [])


def plugin_env(job: dict, runtime: dict, index: int) -> dict[str, str]:
    """The PET_* variables EnforceMLPolicy sets on node `index`."""
    tr, name = job["spec"].get("trainer") or {}, job["metadata"]["name"]
    nodes = tr.get("numNodes") or runtime["spec"]["mlPolicy"].get("numNodes", 1)
    res = tr.get("resourcesPerNode") or trainer_container(runtime).get("resources") or {}
    lim, req = res.get("limits") or {}, res.get("requests") or {}
    gpus = int(lim.get("nvidia.com/gpu", 0) or req.get("nvidia.com/gpu", 0))
    npn = str(tr["numProcPerNode"]) if tr.get("numProcPerNode") is not None else "auto"
    if npn == "auto" and gpus == 0:
        cpu = (res.get("requests") or {}).get("cpu") or (res.get("limits") or {}).get("cpu") or 0
        npn = str(max(1, _cpu(cpu)))
    return {"PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": npn, "PET_NODE_RANK": str(index),
            "PET_MASTER_ADDR": f"{name}-{NODE}-0-0.{name}", "PET_MASTER_PORT": str(MASTER_PORT)}


def node_env(job: dict, runtime: dict, index: int, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The `node` container's environment: runtime env, then trainer.env (secretKeyRef
    resolved; a missing key fails like the kubelet's CreateContainerConfigError), then PET_*."""
    env: dict[str, str] = {}
    tr = job["spec"].get("trainer") or {}
    bad = sorted({e["name"] for e in tr.get("env", [])} & set(RESERVED))
    if bad:
        raise ValueError(f"admission: spec.trainer.env must not have reserved envs {bad}")
    for e in [*trainer_container(runtime).get("env", []), *tr.get("env", [])]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            if ref["key"] not in secrets.get(ref["name"], {}) and not ref.get("optional"):
                raise KeyError(f"CreateContainerConfigError: secret {ref['name']!r} key {ref['key']!r} not found")
            env[e["name"]] = secrets.get(ref["name"], {}).get(ref["key"], "")
    env.update(plugin_env(job, runtime, index))
    return env
