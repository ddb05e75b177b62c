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
  Training Operator's elastic c10d (tests/cluster/operator_contract.py).
- torch.go Validate(): trainer.env must not set any of those five names.
"""
from __future__ import annotations

import math

from tests.cluster.operator_contract import resolve_env

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
    tr = job["spec"].get("trainer") or {}
    bad = sorted({e["name"] for e in tr.get("env", [])} & set(RESERVED))
    if bad:
        raise ValueError(f"admission: spec.trainer.env must not have reserved envs {bad}")
    env = resolve_env([*trainer_container(runtime).get("env", []), *tr.get("env", [])], secrets)
    env.update(plugin_env(job, runtime, index))
    return env


# ------------------------------------------------------------------ the TrainJob webhook
# Trainer v2.3.0 admits a TrainJob through pkg/webhooks/trainjob_webhook.go
# TrainJobValidator.ValidateCreate -> runtime.ValidateObjects: for a ClusterTrainingRuntime
# pkg/runtime/core/clustertrainingruntime.go ClusterTrainingRuntime.ValidateObjects (the
# runtime must exist) -> framework.RunCustomValidationPlugins, i.e. every enabled plugin's
# Validate; for the torch-distributed runtime (mlPolicy.torch, a JobSet template) those are:
# - pkg/runtime/framework/plugins/jobset/jobset.go JobSet.Validate: initializer jobs when
#   spec.initializer asks for them; per runtimePatch: manager must pass
#   k8s.io/apimachinery/pkg/util/validation IsDomainPrefixedPath ("<dns-subdomain>/<path>");
#   every patched replicatedJob must exist in the runtime, every patched (init)container in
#   that job; patched containers named node / dataset-initializer / model-initializer must
#   not carry env (the trainer's env goes through spec.trainer.env).
# - pkg/runtime/framework/plugins/torch/torch.go Torch.Validate: envInjection targets exist
#   in the runtime; spec.trainer.env has none of constants.TorchRunReservedEnvNames; the
#   torchtune checks apply only to command ["tune", "run"] (constants.TorchTuneEntrypoint),
#   which our jobs never use (refused here rather than modelled).
# The CRD's own CEL rules are checked by tests/cluster/crd_schemas.py.
import re  # noqa: E402

DATASET_INIT, MODEL_INIT, VOLUME_INIT = "dataset-initializer", "model-initializer", "initializer"
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_HTTP_PATH = re.compile(r"[A-Za-z0-9/\-._~%!$&'()*+,;=:]+")


def is_domain_prefixed_path(value: str) -> list[str]:
    """k8s.io/apimachinery/pkg/util/validation/validation.go IsDomainPrefixedPath."""
    if not value:
        return ["Required value"]
    host, sep, path = value.partition("/")
    if not sep or not host or not path:
        return [f"Invalid value: {value!r}: must be a domain-prefixed path (such as \"acme.io/foo\")"]
    errs = []
    # IsDNS1123Subdomain: <= 253 characters, dot-separated RFC 1123 labels
    if len(host) > 253 or not all(_DNS1123_LABEL.fullmatch(lab) for lab in host.split(".")):
        errs.append(f"Invalid value: {host!r}: a lowercase RFC 1123 subdomain must consist of lower case "
                    "alphanumeric characters, '-' or '.'")
    if not _HTTP_PATH.fullmatch(path):
        errs.append(f"Invalid value: {path!r}: Invalid path")
    return errs


def _rjobs(runtime: dict) -> dict[str, dict]:
    return {rj["name"]: rj for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]}


def webhook_errors(job: dict, runtimes: dict[str, dict]) -> list[str]:
    """What Trainer v2.3.0's validating webhook says about creating `job`, given the
    ClusterTrainingRuntimes installed ({name: object})."""
    spec = job.get("spec") or {}
    ref = spec.get("runtimeRef") or {}
    if ref.get("apiGroup", "trainer.kubeflow.org") != "trainer.kubeflow.org" or \
            ref.get("kind", "ClusterTrainingRuntime") != "ClusterTrainingRuntime":
        return [f"unsupported runtime: {ref.get('kind')}.{ref.get('apiGroup')}"]
    runtime = runtimes.get(ref.get("name"))
    if runtime is None:
        return [f"spec.RuntimeRef: Invalid value: clustertrainingruntime {ref.get('name')!r} not found: "
                "specified clusterTrainingRuntime must be created before the TrainJob is created"]
    errs: list[str] = []
    rjobs = _rjobs(runtime)
    names = {n: {c["name"] for c in [*rj["template"]["spec"]["template"]["spec"].get("initContainers", []),
                                     *rj["template"]["spec"]["template"]["spec"]["containers"]]}
             for n, rj in rjobs.items()}
    # JobSet.Validate: initializers
    init = spec.get("initializer") or {}
    for what, jobname in (("dataset", DATASET_INIT), ("model", MODEL_INIT)):
        if init.get(what) is None:
            continue
        if jobname not in names:
            errs.append(f"spec.runtimeRef: must have {jobname} job when trainJob is configured with input {what}Config")
        elif jobname not in names[jobname]:
            errs.append(f"spec.runtimeRef: must have container with name - {jobname} in the {jobname} job")
        else:
            c = next(c for c in rjobs[jobname]["template"]["spec"]["template"]["spec"]["containers"]
                     if c["name"] == jobname)
            if not any(v["name"] == VOLUME_INIT for v in c.get("volumeMounts", [])):
                errs.append(f"spec.runtimeRef: must have volumeMount with name - {VOLUME_INIT} in container "
                            f"{jobname} of the {jobname} job")
    # JobSet.Validate: runtimePatches
    for p in spec.get("runtimePatches") or []:
        errs += [f"spec.runtimePatches.manager: {e}" for e in is_domain_prefixed_path(p.get("manager", ""))]
        tmpl = ((p.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec")
        if not tmpl:
            continue
        for rj in tmpl.get("replicatedJobs") or []:
            if rj["name"] not in names:
                errs.append("spec.runtimePatches: must not have replicated job that doesn't exist in the runtime job "
                            f"template ({rj['name']!r})")
                continue
            pod = (((rj.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec")
            if not pod:
                continue
            for c in pod.get("initContainers") or []:
                if c["name"] not in names[rj["name"]]:
                    errs.append(f"spec.runtimePatches: must not have initContainer that doesn't exist in the runtime "
                                f"job {rj['name']} ({c['name']!r})")
            for c in pod.get("containers") or []:
                if c["name"] not in names[rj["name"]]:
                    errs.append(f"spec.runtimePatches: must not have container that doesn't exist in the runtime "
                                f"job {rj['name']} ({c['name']!r})")
                elif c.get("env") and c["name"] in (DATASET_INIT, MODEL_INIT, NODE):
                    errs.append(f"spec.runtimePatches: must not have envs for the {DATASET_INIT}, {MODEL_INIT}, "
                                f"{NODE} containers")
    # Torch.Validate (mlPolicy.torch only)
    torch = (runtime["spec"].get("mlPolicy") or {}).get("torch")
    if torch is not None:
        for t in (torch.get("envInjection") or {}).get("targets") or []:
            for cn in t.get("containerNames") or []:
                if cn not in names.get(t.get("jobName"), set()):
                    errs.append(f"spec.runtimeRef: envInjection target podSet {t.get('jobName')!r} container "
                                f"{cn!r} not found in runtime template")
        tr = spec.get("trainer") or {}
        bad = sorted({e["name"] for e in tr.get("env") or []} & set(RESERVED))
        if bad:
            errs.append(f"spec.trainer.env: must not have reserved envs, invalid envs configured: {bad}")
        if list(tr.get("command") or []) == ["tune", "run"]:
            errs.append("spec.trainer.command: torchtune jobs are not modelled by this contract")
    return errs
