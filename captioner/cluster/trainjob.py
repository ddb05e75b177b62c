"""Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1, Trainer v2.3.0): a pure
builder for a run on the `torch-distributed` ClusterTrainingRuntime and the admission rules
that apply to it. It is built from the same `JobSpec` (captioner/cluster/jobspec.py) as the
PyTorchJob, so both APIs run the same container command, arguments, Secret-backed env, volumes
and node pool.

What the Trainer does with it (github.com/kubeflow/trainer, tag v2.3.0):
- manifests torch-distributed runtime: one replicatedJob `node` (ancestor label `trainer`)
  with one container `node`; mlPolicy.torch.
- pkg/runtime/framework/plugins/jobset/builder.go Trainer(): trainer.image/command/args
  replace the `node` container's; trainer.env is upserted into it.
- pkg/runtime/framework/plugins/torch/torch.go EnforceMLPolicy: numNodes -> the pod count;
  PET_NNODES, PET_NPROC_PER_NODE (numProcPerNode, else "auto" with GPUs, else the CPU count),
  PET_NODE_RANK (the Job completion index), PET_MASTER_ADDR=<job>-node-0-0.<job>,
  PET_MASTER_PORT=29500 -- a static rendezvous, no PET_RDZV_*, no elastic range
  ("TODO: Add support for PyTorch elastic"); Validate() rejects those names in trainer.env.
- TrainJob.spec.runtimePatches (v2.3.0; there is no podTemplateOverrides): per-manager
  patches of the JobSet template; the Pod spec part admits nodeSelector, tolerations,
  volumes, serviceAccountName, securityContext and per-container env/volumeMounts/
  securityContext -- that is where the node pool, /dev/shm and the hardening go.
"""
from __future__ import annotations

import re

from captioner.cluster.jobspec import (TRAINER_CONTAINER_SECURITY, TRAINJOB, JobSpec, job_metadata, pod_metadata,
                                       trainer_limits_and_env, trainer_pod_spec)

RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Trainer v2.3.0 ships
CONTAINER = TRAINJOB.container  # the `node` container: constants.Node in pkg/constants/constants.go
REPLICATED_JOB = "node"  # the runtime's one replicatedJob, also named constants.Node
MASTER_PORT = 29500  # constants.ContainerTrainerPort
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
# runtimePatches are keyed by manager, which v2.3.0's webhook checks with
# IsDomainPrefixedPath (pkg/runtime/framework/plugins/jobset/jobset.go JobSet.Validate):
# "<dns-subdomain>/<path>"; a bare name is refused.
PATCH_MANAGER = "captioner.dev/launcher"


def build_trainjob(s: JobSpec) -> dict:
    """The TrainJob for `s`. TrainJob v2.3.0 has no elastic range: min_workers/max_workers
    must equal workers."""
    if (s.min_workers, s.max_workers) != (s.workers, s.workers):
        raise ValueError(f"TrainJob (Trainer v2.3.0) has no elastic training: min/max nodes "
                         f"{s.min_workers}/{s.max_workers} must equal --nodes {s.workers}")
    limits, env = trainer_limits_and_env(s)
    trainer = {"image": s.image, "command": list(s.command), "args": list(s.args), "env": env,
               "numNodes": s.workers, "resourcesPerNode": {"limits": limits, "requests": dict(limits)}}
    if str(s.nproc_per_node).isdigit():
        trainer["numProcPerNode"] = int(s.nproc_per_node)  # else the plugin's "auto"
    # the image's WORKDIR is /workspace (docker/trainer.Dockerfile): the run folder is an emptyDir there
    pod = {**trainer_pod_spec(s), "containers": [{"name": CONTAINER, **TRAINER_CONTAINER_SECURITY}]}
    patch = {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
        "name": REPLICATED_JOB,
        "template": {"spec": {"template": {
            "metadata": pod_metadata(s),
            "spec": pod}}}}]}}}}
    return {
        "apiVersion": TRAINJOB.api_version,
        "kind": TRAINJOB.kind,
        "metadata": job_metadata(s),
        "spec": {
            "runtimeRef": {"apiGroup": TRAINJOB.group, "kind": "ClusterTrainingRuntime", "name": RUNTIME},
            "activeDeadlineSeconds": s.active_deadline_seconds,
            "trainer": trainer,
            "runtimePatches": [patch],
        },
    }


def webhook_errors(job: dict) -> list[str]:
    """The TrainJob admission rules our jobs could break: the CRD's CEL rules on the name
    (RFC 1035, <= 63), the jobset plugin's Validate (runtimePatches[].manager a
    domain-prefixed path; no env on the patched `node` container) and the torch plugin's
    Validate (no reserved PET_* in trainer.env). tests/cluster/trainer_contract.py ports the whole
    webhook and runs it on what `captioner job render` prints."""
    errs = []
    name = job.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errs.append(f"metadata.name {name!r} is not an RFC 1035 DNS label of at most 63 characters")
    spec = job.get("spec", {})
    if spec.get("runtimeRef", {}).get("name") != RUNTIME:
        errs.append(f"runtimeRef.name must be {RUNTIME!r}, got {spec.get('runtimeRef', {}).get('name')!r}")
    tr = spec.get("trainer") or {}
    bad = sorted({e.get("name") for e in tr.get("env", [])} & set(RESERVED_ENV))
    if bad:
        errs.append(f"spec.trainer.env must not have reserved envs, invalid envs configured: {bad}")
    for p in spec.get("runtimePatches") or []:
        host, _, path = str(p.get("manager", "")).partition("/")
        if not path or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", host):
            errs.append(f"spec.runtimePatches.manager {p.get('manager')!r} must be a domain-prefixed path "
                        "(such as \"acme.io/foo\")")
        for rj in p.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", []):
            for c in rj.get("template", {}).get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if c.get("name") == CONTAINER and c.get("env"):
                    errs.append("spec.runtimePatches: must not have envs for the node container (use spec.trainer.env)")
    if tr.get("numNodes", 1) < 1:
        errs.append(f"spec.trainer.numNodes {tr.get('numNodes')} must be >= 1")
    return errs
