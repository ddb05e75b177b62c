"""What a training job on the cluster is, whichever Kubeflow API runs it: the two APIs
(`JobKind`: group, version, kind, the condition that means done, the training container and
node 0's pod), the `JobSpec` one run is described by, and the trainer pod both builders put in
their object (account, pod security, volumes, node pool, limits, Secret-backed env).

`pytorchjob.build_pytorchjob` and `trainjob.build_trainjob` turn a JobSpec into their
object; `jobs.training_job` picks one and `jobs.launch_and_wait` runs it.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from captioner.core.deployment import (GPU_NODE_SELECTOR, GPU_TOLERATION, JOB_NAMESPACE, NODE_POOLS, S3_ENV,
                                       TRAINER_IMAGE, TRAINER_S3_SECRET, TRAINER_SERVICE_ACCOUNT)


@dataclass(frozen=True)
class JobKind:
    api: str  # the name users pick it by (--train.api)
    group: str
    version: str
    plural: str
    kind: str
    done: str  # the condition type that means success
    container: str  # the training container, whose log is streamed
    first_pod: str  # label selector of node 0's pod; {name} is the job's name

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


# The launcher's done conditions are cited in captioner/cluster/jobs.py. The PyTorchJob operator
# finds the training container by its name `pytorch`; the TrainJob's is constants.Node
# (pkg/constants/constants.go).
PYTORCHJOB = JobKind("pytorchjob", "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", "Succeeded", "pytorch",
                     "training.kubeflow.org/job-name={name},training.kubeflow.org/replica-index=0")
# JobSet labels its pods with the JobSet (= TrainJob) name; the Job controller labels each
# indexed pod with its completion index (Kubernetes >= 1.28).
TRAINJOB = JobKind("trainjob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", "Complete", "node",
                   "jobset.sigs.k8s.io/jobset-name={name},batch.kubernetes.io/job-completion-index=0")
KINDS = {k.kind: k for k in (PYTORCHJOB, TRAINJOB)}
APIS = {k.api: k for k in (PYTORCHJOB, TRAINJOB)}


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


def training_spec(name: str, config: str, overrides: list[str], model_uri: str, *, workers: int = 2,
                  gpus_per_worker: int = 8, image: str = TRAINER_IMAGE, namespace: str = JOB_NAMESPACE,
                  cloud: str = "gke", nproc_per_node: str | None = None, min_workers: int | None = None,
                  max_workers: int | None = None, cpu: str = "8", memory: str = "64Gi", shm_size: str = "16Gi",
                  s3_secret: str = TRAINER_S3_SECRET) -> JobSpec:
    """The JobSpec of one run. Checkpoints go to model_uri as they are written and every start
    passes --resume, so a restarted pod (OnFailure, torchrun restart, KFP retry) continues
    from the latest checkpoint in the store instead of from scratch."""
    if cloud not in CLOUD_POOLS:
        raise ValueError(f"unknown cloud {cloud!r}: one of {', '.join(CLOUD_POOLS)}")
    if workers < 1 or gpus_per_worker < 0:
        raise ValueError(f"workers must be >= 1 and gpus_per_worker >= 0, got {workers} and {gpus_per_worker}")
    if not model_uri:
        raise ValueError("model_uri is required: the trainer writes its checkpoints there and resumes from them")
    npn = nproc_per_node or (str(gpus_per_worker) if gpus_per_worker > 0 else "1")
    return JobSpec(name=name, namespace=namespace, image=image,
                   args=["--config", config, "--no-progress", "--resume", *overrides, f"--train.out_dir={RUN_DIR}",
                         f"--train.publish_uri={model_uri}"],
                   workers=workers, min_workers=min_workers or workers, max_workers=max_workers or workers,
                   gpus_per_worker=gpus_per_worker, nproc_per_node=npn, pool=CLOUD_POOLS[cloud], cpu=cpu,
                   memory=memory, shm_size=shm_size, s3_secret=s3_secret)


# The trainer container's hardening and writable folders (read-only root filesystem), shared by
# the PyTorchJob and the TrainJob builders.
TRAINER_CONTAINER_SECURITY = {
    "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]}},
    "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"},
                     {"name": "workspace", "mountPath": WORKDIR}],
}
TRAINER_POD_LABELS = {"app.kubernetes.io/name": "captioner-trainer"}  # plus captioner/job: the job's name
JOB_LABELS = {"app.kubernetes.io/part-of": "captioner"}


def trainer_pod_spec(s: JobSpec) -> dict:
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


def trainer_limits_and_env(s: JobSpec) -> tuple[dict, list[dict]]:
    """Per-node resource limits and the trainer container's env (S3 settings from the Secret)."""
    limits = {"cpu": s.cpu, "memory": s.memory}
    if s.gpus_per_worker > 0:
        limits = {"nvidia.com/gpu": str(s.gpus_per_worker), **limits}
    env = [{"name": n, "valueFrom": {"secretKeyRef": {"name": s.s3_secret, "key": k}}} for k, n in S3_ENV.items()]
    env += [{"name": "NCCL_DEBUG", "value": "WARN"}, {"name": "OMP_NUM_THREADS", "value": "4"},
            {"name": "HOME", "value": "/tmp"}]
    return limits, env


def job_metadata(s: JobSpec) -> dict:
    return {"name": s.name, "namespace": s.namespace, "labels": dict(JOB_LABELS)}


def pod_metadata(s: JobSpec) -> dict:
    return {"labels": {**TRAINER_POD_LABELS, "captioner/job": s.name}}
