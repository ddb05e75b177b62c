"""Kubeflow Training Operator v1 PyTorchJob: a pure builder, the webhook's rules, the cost
guard, and a launcher that creates the job, follows it and cleans up.

The launcher talks to the cluster through a small API surface (create/get/delete of the
custom object, pod lookup and log reading) so its state machine is testable without a
cluster; `KubeApi` implements it with the official kubernetes client.
"""
from __future__ import annotations

import hashlib
import logging

import re
from dataclasses import dataclass, field

from captioner.core.deployment import (GPU_NODE_SELECTOR, GPU_TOLERATION, JOB_NAMESPACE, NODE_POOLS, RDZV_PORT,
                                  RDZV_PORT_NAME, S3_ENV, TRAINER_IMAGE, TRAINER_S3_SECRET, TRAINER_SERVICE_ACCOUNT)

log = logging.getLogger(__name__)
GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass
class NodePool:
    """Where the GPU workers land; defaults fit GKE A100 pools, override per cloud."""
    node_selector: dict = field(default_factory=lambda: dict([GPU_NODE_SELECTOR]))
    tolerations: list = field(default_factory=lambda: [dict(GPU_TOLERATION)])


CLOUD_POOLS = {cloud: NodePool(dict(sel), [dict(t) for t in tol]) for cloud, (sel, tol) in NODE_POOLS.items()}


# torchrun reads every launcher setting from the PET_* variables the operator sets on an
# elastic job (training-operator v1.9 pkg/controller.v1/pytorch/envvar.go setPodEnv and
# elastic.go: PET_RDZV_ENDPOINT, PET_RDZV_BACKEND, PET_NNODES=min:max, PET_MAX_RESTARTS,
# PET_NPROC_PER_NODE); MASTER_ADDR/WORLD_SIZE/RANK exist only with a Master replica, which
# an elastic job has not. So the container runs torchrun, never the script directly.
TORCHRUN_COMMAND = ["torchrun", "-m", "captioner", "train"]
WORKDIR, RUN_DIR = "/workspace", "run"  # the pod's local copy of the run (an emptyDir); the store holds the truth


@dataclass
class JobSpec:
    name: str
    namespace: str = JOB_NAMESPACE
    image: str = TRAINER_IMAGE
    command: list = field(default_factory=lambda: list(TORCHRUN_COMMAND))
    args: list = field(default_factory=list)
    workers: int = 2  # initial Worker replicas (nodes)
    min_workers: int = 1
    max_workers: int = 4
    gpus_per_worker: int = 8
    nproc_per_node: str = "auto"  # torchrun --nproc-per-node; a string in the CRD
    cpu: str = "8"
    memory: str = "64Gi"
    shm_size: str = "16Gi"
    max_restarts: int = 3
    pool: NodePool = field(default_factory=NodePool)
    s3_secret: str = TRAINER_S3_SECRET  # keys: endpoint, access-key, secret-key
    ttl_seconds_after_finished: int = 3600
    active_deadline_seconds: int = 24 * 3600
    backoff_limit: int = 3
    service_account: str = TRAINER_SERVICE_ACCOUNT  # no permissions; its token is not mounted


def job_name(prefix: str, run_id: str) -> str:
    """Deterministic DNS-1035 name: a KFP retry of the same run gets the same name (and so
    re-attaches on 409 instead of starting a second job)."""
    base = re.sub(r"[^a-z0-9-]", "-", prefix.lower()).strip("-") or "train"
    if not base[0].isalpha():
        base = "j-" + base
    digest = hashlib.sha1(run_id.encode()).hexdigest()[:10]
    return f"{base[:40].rstrip('-')}-{digest}"


# The trainer container's hardening and writable folders (read-only root filesystem), shared by
# the PyTorchJob and the TrainJob builders.
TRAINER_CONTAINER_SECURITY = {
    "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]}},
    "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"},
                     {"name": "workspace", "mountPath": WORKDIR}],
}


def trainer_pod_spec(s: "JobSpec") -> dict:
    """Pod-level fields of a trainer pod: its account, pod security, volumes and node pool."""
    spec = {
        "serviceAccountName": s.service_account,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": s.shm_size}},
                    {"name": "tmp", "emptyDir": {}}, {"name": "workspace", "emptyDir": {}}],
    }
    if s.pool.node_selector:
        spec["nodeSelector"] = dict(s.pool.node_selector)
    if s.pool.tolerations:
        spec["tolerations"] = [dict(t) for t in s.pool.tolerations]
    return spec


def trainer_limits_and_env(s: "JobSpec") -> tuple[dict, list[dict]]:
    """Per-node resource limits and the trainer container's env (S3 settings from the Secret)."""
    limits = {"cpu": s.cpu, "memory": s.memory}
    if s.gpus_per_worker > 0:
        limits = {"nvidia.com/gpu": str(s.gpus_per_worker), **limits}
    env = [{"name": n, "valueFrom": {"secretKeyRef": {"name": s.s3_secret, "key": k}}} for k, n in S3_ENV.items()]
    env += [{"name": "NCCL_DEBUG", "value": "WARN"}, {"name": "OMP_NUM_THREADS", "value": "4"},
            {"name": "HOME", "value": "/tmp"}]
    return limits, env


def build_pytorchjob(s: JobSpec) -> dict:
    limits, env = trainer_limits_and_env(s)
    pod = {
        "metadata": {"labels": {"app.kubernetes.io/name": "captioner-trainer", "captioner/job": s.name}},
        "spec": {
            **trainer_pod_spec(s),
            "automountServiceAccountToken": False,
            "containers": [{
                "name": "pytorch",  # the operator finds the container by this name
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
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": s.name, "namespace": s.namespace, "labels": {"app.kubernetes.io/part-of": "captioner"}},
        "spec": {
            "elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": s.min_workers, "maxReplicas": s.max_workers,
                              "maxRestarts": s.max_restarts},
            "nprocPerNode": str(s.nproc_per_node),
            "runPolicy": {"cleanPodPolicy": "None", "ttlSecondsAfterFinished": s.ttl_seconds_after_finished,
                          "activeDeadlineSeconds": s.active_deadline_seconds, "backoffLimit": s.backoff_limit},
            "pytorchReplicaSpecs": {"Worker": {"replicas": s.workers, "restartPolicy": "OnFailure", "template": pod}},
        },
    }




def training_job(name: str, config: str, overrides: list[str], model_uri: str, *, workers: int = 2,
                 gpus_per_worker: int = 8, image: str = TRAINER_IMAGE, namespace: str = JOB_NAMESPACE,
                 cloud: str = "gke", nproc_per_node: str | None = None, min_workers: int | None = None,
                 max_workers: int | None = None, cpu: str = "8", memory: str = "64Gi", shm_size: str = "16Gi",
                 s3_secret: str = TRAINER_S3_SECRET, api: str = "pytorchjob") -> dict:
    """The training job for one run, as the pipeline's train step and `captioner job render`
    both build it: a PyTorchJob (api="pytorchjob") or a Trainer v2 TrainJob on the
    torch-distributed runtime (api="trainjob", captioner/cluster/trainjob.py), from one JobSpec.
    Checkpoints go to model_uri as they are written and every start
    passes --resume, so a restarted pod (OnFailure, torchrun restart, KFP retry) continues
    from the latest checkpoint in the store instead of from scratch."""
    if cloud not in CLOUD_POOLS:
        raise ValueError(f"unknown cloud {cloud!r}: one of {', '.join(CLOUD_POOLS)}")
    if workers < 1 or gpus_per_worker < 0:
        raise ValueError(f"workers must be >= 1 and gpus_per_worker >= 0, got {workers} and {gpus_per_worker}")
    if not model_uri:
        raise ValueError("model_uri is required: the trainer writes its checkpoints there and resumes from them")
    npn = nproc_per_node or (str(gpus_per_worker) if gpus_per_worker > 0 else "1")
    spec = JobSpec(name=name, namespace=namespace, image=image,
                   args=["--config", config, "--no-progress", "--resume", *overrides, f"--train.out_dir={RUN_DIR}",
                         f"--train.publish_uri={model_uri}"],
                   workers=workers, min_workers=min_workers or workers, max_workers=max_workers or workers,
                   gpus_per_worker=gpus_per_worker, nproc_per_node=npn, pool=CLOUD_POOLS[cloud], cpu=cpu,
                   memory=memory, shm_size=shm_size, s3_secret=s3_secret)
    if api == "pytorchjob":
        job = build_pytorchjob(spec)
        errs = webhook_errors(job)
    elif api == "trainjob":
        from captioner.cluster import trainjob
        job = trainjob.build_trainjob(spec)
        errs = trainjob.webhook_errors(job)
    else:
        raise ValueError(f"training api {api!r}: one of pytorchjob, trainjob")
    if errs:
        raise ValueError(f"{job['kind']} {name} would be rejected: {'; '.join(errs)}")
    return job


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
        if not any(c.get("name") == "pytorch" for c in containers):
            errs.append(f"{rtype}: no container named 'pytorch'")
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


# ------------------------------------------------------------------ cost guard
DEFAULT_PAIRS_PER_S_PER_GPU = 900.0  # the pipeline's cost guard default (cluster settings override it)
DEFAULT_PRICE_PER_GPU_HOUR = 3.0


@dataclass
class CostEstimate:
    gpus: int
    hours: float
    gpu_hours: float
    cost: float
    price_per_gpu_hour: float

    def text(self) -> str:
        return (f"estimated {self.gpu_hours:.1f} GPU-hours ({self.gpus} GPUs x {self.hours:.2f} h) "
                f"= ${self.cost:,.2f} at ${self.price_per_gpu_hour:.2f}/GPU-hour")


def estimate_cost(pairs_per_epoch: int, epochs: int, pairs_per_s_per_gpu: float, gpus: int,
                  price_per_gpu_hour: float, scaling_efficiency: float = 0.9) -> CostEstimate:
    """Hours from measured per-GPU throughput; multi-GPU runs rarely scale perfectly."""
    if pairs_per_s_per_gpu <= 0 or gpus <= 0:
        raise ValueError("pairs_per_s_per_gpu and gpus must be positive")
    eff = 1.0 if gpus == 1 else scaling_efficiency
    hours = pairs_per_epoch * epochs / (pairs_per_s_per_gpu * gpus * eff) / 3600
    return CostEstimate(gpus, hours, hours * gpus, hours * gpus * price_per_gpu_hour, price_per_gpu_hour)


class CostLimitExceeded(RuntimeError):
    pass


def check_cost(est: CostEstimate, max_cost: float, override: bool = False) -> None:
    log.info("cost guard: %s (limit $%.2f)", est.text(), max_cost)
    if est.cost > max_cost and not override:
        raise CostLimitExceeded(f"refusing to launch: {est.text()} exceeds max_cost ${max_cost:,.2f} "
                                "(raise max_cost or pass the override)")


# ------------------------------------------------------------------ launcher
# One launcher for PyTorchJob and TrainJob (captioner/cluster/jobs.py); re-exported here.
from captioner.cluster.jobs import (ApiConflict, JobApi, JobFailed, JobTimeout, KubeApi,  # noqa: E402,F401
                                job_state, launch_and_wait)
