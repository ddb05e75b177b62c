"""What the Kubeflow Training Operator v1.9.0 does to a PyTorchJob before its pods start,
written from its source (github.com/kubeflow/training-operator, tag v1.9.0):

- pkg/apis/kubeflow.org/v1/pytorch_defaults.go SetDefaults_PyTorchJob: replicas default 1,
  restartPolicy OnFailure, a container port `pytorchjob-port`=23456 on the `pytorch`
  container when it has none, elasticPolicy min/max default to each other or to the Worker
  replicas, nprocPerNode defaults to "auto" unless elasticPolicy.nProcPerNode is set.
- pkg/controller.v1/pytorch/envvar.go setPodEnv: PYTHONUNBUFFERED=1; MASTER_ADDR,
  MASTER_PORT, WORLD_SIZE, RANK and PET_NODE_RANK ONLY when a Master replica exists;
  PET_NPROC_PER_NODE from spec.nprocPerNode; with an elasticPolicy the elastic variables,
  else PET_NNODES = total replicas.
- pkg/controller.v1/pytorch/elastic.go Generate: PET_RDZV_ENDPOINT = rdzvHost or
  "<job>-worker-0" : rdzvPort or the Worker's `pytorchjob-port`; PET_RDZV_BACKEND (c10d
  default); PET_NNODES = "min:max"; PET_MAX_RESTARTS, PET_NPROC_PER_NODE (from
  elasticPolicy.nProcPerNode), PET_RDZV_ID, PET_RDZV_CONF, PET_STANDALONE when set.
- master.go: MASTER_PORT/PET_MASTER_PORT from the Master's port, MASTER_ADDR/PET_MASTER_ADDR =
  "<job>-master-0".

The container env the kubelet gives the pod is the template's env (secretKeyRef values
resolved from the Secret) followed by these.
"""
from __future__ import annotations

import copy

DEFAULT_PORT_NAME, DEFAULT_PORT, CONTAINER = "pytorchjob-port", 23456, "pytorch"


def apply_defaults(job: dict) -> dict:
    job = copy.deepcopy(job)
    spec = job["spec"]
    for rs in spec["pytorchReplicaSpecs"].values():
        rs.setdefault("replicas", 1)
        rs.setdefault("restartPolicy", "OnFailure")
        for c in rs["template"]["spec"]["containers"]:
            if c["name"] == CONTAINER and not any(p.get("name") == DEFAULT_PORT_NAME for p in c.get("ports", [])):
                c.setdefault("ports", []).append({"name": DEFAULT_PORT_NAME, "containerPort": DEFAULT_PORT})
    ep = spec.get("elasticPolicy")
    if ep is not None:
        lo, hi = ep.get("minReplicas"), ep.get("maxReplicas")
        if lo is None and hi is None:
            ep["minReplicas"] = ep["maxReplicas"] = spec["pytorchReplicaSpecs"]["Worker"]["replicas"]
        elif lo is None:
            ep["minReplicas"] = hi
        elif hi is None:
            ep["maxReplicas"] = lo
    if (ep is not None and ep.get("nProcPerNode") is None) or ep is None:
        spec.setdefault("nprocPerNode", "auto")
    return job


def _port(job: dict, rtype: str) -> int:
    for c in job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]["containers"]:
        if c["name"] == CONTAINER:
            for p in c.get("ports", []):
                if p.get("name") == DEFAULT_PORT_NAME:
                    return int(p["containerPort"])
    raise ValueError("port not found")


def operator_env(job: dict, rtype: str, index: int) -> dict[str, str]:
    """The variables setPodEnv appends to the `pytorch` container of replica rtype/index."""
    job = apply_defaults(job)
    spec, name = job["spec"], job["metadata"]["name"]
    replicas = spec["pytorchReplicaSpecs"]
    env = {"PYTHONUNBUFFERED": "1"}
    total = sum(int(r["replicas"]) for r in replicas.values())
    npn = spec.get("nprocPerNode")
    nproc_int = int(npn) if npn is not None and str(npn).isdigit() else 1
    if "Master" in replicas:
        rank = index + 1 if rtype == "Worker" else index
        port, addr = str(_port(job, "Master")), f"{name}-master-0"
        env.update(MASTER_PORT=port, PET_MASTER_PORT=port, MASTER_ADDR=addr, PET_MASTER_ADDR=addr,
                   WORLD_SIZE=str(total * nproc_int), RANK=str(rank), PET_NODE_RANK=str(rank))
    if npn is not None:
        env["PET_NPROC_PER_NODE"] = str(npn)
    ep = spec.get("elasticPolicy")
    if ep is not None:
        host = ep.get("rdzvHost") or f"{name}-worker-0"
        port = ep.get("rdzvPort") or _port(job, "Worker")
        env["PET_RDZV_ENDPOINT"] = f"{host}:{port}"
        env["PET_RDZV_BACKEND"] = ep.get("rdzvBackend") or "c10d"
        env["PET_NNODES"] = f"{ep['minReplicas']}:{ep['maxReplicas']}"
        if ep.get("maxRestarts") is not None:
            env["PET_MAX_RESTARTS"] = str(ep["maxRestarts"])
        if ep.get("nProcPerNode") is not None:
            env["PET_NPROC_PER_NODE"] = str(ep["nProcPerNode"])
        if ep.get("rdzvId") is not None:
            env["PET_RDZV_ID"] = ep["rdzvId"]
        if ep.get("rdzvConf"):
            env["PET_RDZV_CONF"] = ",".join(f"{c['key']}={c['value']}" for c in ep["rdzvConf"])
        if ep.get("standalone"):
            env["PET_STANDALONE"] = ""
    else:
        env["PET_NNODES"] = str(total)
    return env


def pod_env(job: dict, rtype: str, index: int, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The `pytorch` container's full environment: template env (secrets resolved, a missing
    Secret key fails like the kubelet's CreateContainerConfigError) + the operator's."""
    c = next(c for c in job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]["containers"]
             if c["name"] == CONTAINER)
    env = resolve_env(c.get("env", []), secrets)
    env.update(operator_env(job, rtype, index))
    return env


def resolve_env(entries: list[dict], secrets: dict) -> dict:
    """A container's `env` list as the kubelet resolves it: values, and secretKeyRefs from
    `secrets` ({name: {key: value}}); a missing key of a required Secret fails like the
    kubelet's CreateContainerConfigError."""
    env = {}
    for e in entries:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            if ref["key"] not in secrets.get(ref["name"], {}) and not ref.get("optional"):
                raise KeyError(f"CreateContainerConfigError: secret {ref['name']!r} key {ref['key']!r} not found")
            env[e["name"]] = secrets.get(ref["name"], {}).get(ref["key"], "")
    return env


# ------------------------------------------------------------------ the PyTorchJob webhook
# Training Operator v1.9.0 pkg/webhooks/pytorch/pytorchjob_webhook.go validatePyTorchJob
# (ValidateCreate): metadata.name apimachineryvalidation.NameIsDNS1035Label;
# pkg/common/util/webhooks.go ValidateRunPolicy (runPolicy.managedBy one of
# kubeflow.org/training-operator, kueue.x-k8s.io/multikueue); validateSpec (elasticPolicy needs
# a Worker replica spec; elasticPolicy.nProcPerNode is forbidden together with nprocPerNode);
# validatePyTorchReplicaSpecs (specs required; only Master/Worker; containers required, each
# with an image, one named `pytorch`; Master replicas exactly 1; other replicas >= 1 when set).
import re  # noqa: E402

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MANAGERS = ("kubeflow.org/training-operator", "kueue.x-k8s.io/multikueue")


def webhook_errors(job: dict) -> list[str]:
    errs: list[str] = []
    name = (job.get("metadata") or {}).get("name", "")
    if len(name) > 63 or not _DNS1035.fullmatch(name):
        errs.append(f"metadata.name: Invalid value: {name!r}: should match: a DNS-1035 label")
    spec = job.get("spec") or {}
    mb = (spec.get("runPolicy") or {}).get("managedBy")
    if mb is not None and mb not in MANAGERS:
        errs.append(f"spec.runPolicy.managedBy: Unsupported value: {mb!r}")
    rs = spec.get("pytorchReplicaSpecs")
    ep = spec.get("elasticPolicy")
    if ep is not None:
        if "Worker" not in (rs or {}):
            errs.append("spec.pytorchReplicaSpecs[Worker]: Required value: must be configured if elastic policy "
                        "is used")
        if ep.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
            errs.append("spec.elasticPolicy.nProcPerNode: Forbidden: must not be used with spec.nprocPerNode")
    if rs is None:
        errs.append("spec.pytorchReplicaSpecs: Required value: must be required")
    for rtype, r in (rs or {}).items():
        path = f"spec.pytorchReplicaSpecs[{rtype}]"
        if rtype not in ("Master", "Worker"):
            errs.append(f"{path}: Unsupported value: {rtype!r}")
        containers = ((((r or {}).get("template") or {}).get("spec") or {}).get("containers")) or []
        if not containers:
            errs.append(f"{path}.template.spec.containers: Required value: must be specified")
        for i, c in enumerate(containers):
            if not c.get("image"):
                errs.append(f"{path}.template.spec.containers[{i}].image: Required value: must be required")
        if not any(c.get("name") == CONTAINER for c in containers):
            errs.append(f"{path}.template.spec.containers: Required value: must have at least one container with "
                        f"name {CONTAINER}")
        n = (r or {}).get("replicas")
        if rtype == "Master" and n != 1:
            errs.append(f"{path}.replicas: Forbidden: must be 1")
        elif rtype != "Master" and n is not None and n < 1:
            errs.append(f"{path}.replicas: Forbidden: must be at least 1")
    return errs
