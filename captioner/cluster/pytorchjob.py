"""Kubeflow Training Operator v1 PyTorchJob (kubeflow.org/v1, Training Operator v1.9): a pure
builder from a `JobSpec` (elastic Worker replicas, c10d rendezvous) and the operator's
validating webhook rules. `captioner.cluster.jobs` picks this API or the TrainJob and runs it.
"""
from __future__ import annotations

import re

from captioner.cluster.jobspec import (PYTORCHJOB, TRAINER_CONTAINER_SECURITY, WORKDIR, JobSpec, job_metadata,
                                       pod_metadata, trainer_limits_and_env, trainer_pod_spec)
from captioner.core.deployment import RDZV_PORT, RDZV_PORT_NAME

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def build_pytorchjob(s: JobSpec) -> dict:
    limits, env = trainer_limits_and_env(s)
    pod = {
        "metadata": pod_metadata(s),
        "spec": {
            **trainer_pod_spec(s),
            "automountServiceAccountToken": False,
            "containers": [{
                "name": PYTORCHJOB.container,  # the operator finds the container by this name
                "image": s.image,
                "imagePullPolicy": "IfNotPresent",
                "command": list(s.command),
                "workingDir": WORKDIR,
                "args": list(s.args),
                "env": env,
                # the rendezvous port: the operator builds PET_RDZV_ENDPOINT from the port with this name
                "ports": [{"name": RDZV_PORT_NAME, "containerPort": RDZV_PORT, "protocol": "TCP"}],
                "resources": {"limits": limits, "requests": dict(limits)},
                **TRAINER_CONTAINER_SECURITY,
            }],
        },
    }
    pod["spec"]["volumes"] = pod["spec"].pop("volumes")  # after the containers, as kubectl prints it
    return {
        "apiVersion": PYTORCHJOB.api_version,
        "kind": PYTORCHJOB.kind,
        "metadata": job_metadata(s),
        "spec": {
            "elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": s.min_workers, "maxReplicas": s.max_workers,
                              "maxRestarts": s.max_restarts},
            "nprocPerNode": str(s.nproc_per_node),
            "runPolicy": {"cleanPodPolicy": "None", "ttlSecondsAfterFinished": s.ttl_seconds_after_finished,
                          "activeDeadlineSeconds": s.active_deadline_seconds, "backoffLimit": s.backoff_limit},
            "pytorchReplicaSpecs": {"Worker": {"replicas": s.workers, "restartPolicy": "OnFailure", "template": pod}},
        },
    }


def webhook_errors(job: dict) -> list[str]:
    """The Training Operator v1.9 validating webhook's rules for PyTorchJob."""
    errs = []
    name = job.get("metadata", {}).get("name", "")
    if not DNS1035.match(name) or len(name) > 63:
        errs.append(f"metadata.name {name!r} is not a DNS-1035 label")
    spec = job.get("spec", {})
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if not replicas:
        errs.append("spec.pytorchReplicaSpecs is empty")
    for rtype, rs in replicas.items():
        if rtype not in ("Master", "Worker"):
            errs.append(f"replica type {rtype!r} is not Master or Worker")
        containers = rs.get("template", {}).get("spec", {}).get("containers", [])
        if not any(c.get("name") == PYTORCHJOB.container for c in containers):
            errs.append(f"{rtype}: no container named {PYTORCHJOB.container!r}")
        for c in containers:
            if not c.get("image"):
                errs.append(f"{rtype}: container {c.get('name')!r} has no image")
    if "Master" in replicas and replicas["Master"].get("replicas", 1) != 1:
        errs.append("Master must have exactly 1 replica")
    ep = spec.get("elasticPolicy")
    if ep:
        if "Worker" not in replicas:
            errs.append("elasticPolicy needs a Worker replica spec")
        lo, hi = ep.get("minReplicas"), ep.get("maxReplicas")
        n = replicas.get("Worker", {}).get("replicas", 1)
        if lo is not None and hi is not None and lo > hi:
            errs.append(f"elasticPolicy.minReplicas {lo} > maxReplicas {hi}")
        if lo is not None and n < lo or hi is not None and n > hi:
            errs.append(f"Worker replicas {n} outside elasticPolicy [{lo}, {hi}]")
    npn = spec.get("nprocPerNode")
    if npn is not None and not (isinstance(npn, str) and (npn in ("auto", "cpu", "gpu") or npn.isdigit())):
        errs.append(f"nprocPerNode {npn!r} must be a string: auto, cpu, gpu or a number")
    return errs
