"""One launcher for both Kubeflow training APIs: create the job, follow its conditions and
the first node's log, re-attach on 409 (a KFP retry of the same run), delete it at the end.

- PyTorchJob (kubeflow.org/v1, Training Operator v1.9): done when condition `Succeeded` is
  True (pkg/apis/kubeflow.org/v1/common_types.go JobSucceeded/JobFailed).
- TrainJob (trainer.kubeflow.org/v1alpha1, Trainer v2.3.0): done when `Complete` is True,
  failed when `Failed` is True (pkg/apis/trainer/v1alpha1/trainjob_types.go
  TrainJobComplete/TrainJobFailed, set from the JobSet's conditions in
  pkg/runtime/framework/plugins/jobset/jobset.go).

The cluster is reached through a small surface (`JobApi`: create/get/delete of one kind of
custom object plus the first node's log) so the state machine is tested without a cluster;
`KubeApi(kind)` implements it with the official kubernetes client. `served_kind` picks the
API by discovery (`GET /apis/<group>/<version>`, as `kubectl api-resources` does).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

log = logging.getLogger(__name__)


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

    def errors(self, job: dict) -> list[str]:
        if self.kind == "PyTorchJob":
            from captioner.cluster.pytorchjob import webhook_errors
        else:
            from captioner.cluster.trainjob import webhook_errors
        return webhook_errors(job)


PYTORCHJOB = JobKind("pytorchjob", "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", "Succeeded", "pytorch",
                     "training.kubeflow.org/job-name={name},training.kubeflow.org/replica-index=0")
# JobSet labels its pods with the JobSet (= TrainJob) name; the Job controller labels each
# indexed pod with its completion index (Kubernetes >= 1.28).
TRAINJOB = JobKind("trainjob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", "Complete", "node",
                   "jobset.sigs.k8s.io/jobset-name={name},batch.kubernetes.io/job-completion-index=0")
KINDS = {k.kind: k for k in (PYTORCHJOB, TRAINJOB)}
APIS = {k.api: k for k in (PYTORCHJOB, TRAINJOB)}


def kind_of(job: dict) -> JobKind:
    k = job.get("kind")
    if k not in KINDS or job.get("apiVersion") != f"{KINDS[k].group}/{KINDS[k].version}":
        raise ValueError(f"not a training job this launcher knows: {job.get('apiVersion')} {k}")
    return KINDS[k]


class JobApi(Protocol):
    def create(self, namespace: str, body: dict) -> dict: ...
    def get(self, namespace: str, name: str) -> dict: ...
    def delete(self, namespace: str, name: str) -> None: ...
    def master_logs(self, namespace: str, name: str, since_seconds: int | None) -> str: ...


class ApiConflict(Exception):
    """HTTP 409 from create: the object already exists."""


class JobFailed(RuntimeError):
    pass


class JobTimeout(RuntimeError):
    pass


def job_state(job: dict, done: str = "Succeeded") -> tuple[str, str]:
    """(state, reason) from the job's conditions: `done` (Succeeded/Complete), Failed, or the
    last True condition (Running, Created, ...), else Pending."""
    conds = (job.get("status") or {}).get("conditions") or []
    for want in (done, "Failed"):
        for c in conds:
            if c.get("type") == want and c.get("status") == "True":
                return want, f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")
    live = [c for c in conds if c.get("status") == "True"]
    return (live[-1]["type"], live[-1].get("reason", "")) if live else ("Pending", "")


def launch_and_wait(api: JobApi, job: dict, timeout_s: float = 24 * 3600, poll_s: float = 15.0,
                    on_log: Callable[[str], None] = print, delete_after: bool = True,
                    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict:
    k = kind_of(job)
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    errs = k.errors(job)
    if errs:
        raise ValueError(f"{k.kind} {name} would be rejected: {'; '.join(errs)}")
    try:
        api.create(ns, job)
        log.info("created %s %s/%s", k.kind, ns, name)
    except ApiConflict:
        log.info("%s %s/%s already exists (a retry of this run): re-attaching", k.kind, ns, name)
    start, seen_logs = clock(), 0
    state = "Pending"
    try:
        while True:
            cur = api.get(ns, name)
            state, reason = job_state(cur, k.done)
            try:
                text = api.master_logs(ns, name, None)
                if text and len(text) > seen_logs:
                    on_log(text[seen_logs:])
                    seen_logs = len(text)
            except Exception as e:  # noqa: BLE001 - logs are best effort
                log.debug("logs not available yet: %s", e)
            if state == k.done:
                log.info("%s %s finished: %s", k.kind, name, state)
                return cur
            if state == "Failed":
                raise JobFailed(f"{k.kind} {ns}/{name} failed: {reason or 'no reason given'}")
            if clock() - start > timeout_s:
                raise JobTimeout(f"{k.kind} {ns}/{name} still {state} after {timeout_s:.0f}s")
            sleep(poll_s)
    finally:
        # a finished job is deleted when asked (else its TTL removes it); one we stop
        # following (timeout, error) is always deleted so it stops burning GPUs
        if delete_after or state not in (k.done, "Failed"):
            try:
                api.delete(ns, name)
                log.info("deleted %s %s/%s (%s)", k.kind, ns, name, state)
            except Exception as e:  # noqa: BLE001 - TTL cleans up if this fails
                log.warning("could not delete %s/%s (its TTL will): %s", ns, name, e)


# ------------------------------------------------------------------ API discovery
def served_kind(choice: str, discover: Callable[[str], dict | None]) -> JobKind:
    """The JobKind for --train.api: `pytorchjob`, `trainjob`, or `auto` = the one whose
    resource the cluster serves. `discover(path)` returns the APIResourceList at
    /apis/<group>/<version> or None on 404. With both installed, auto picks TrainJob (Trainer
    v2 is where Kubeflow training continues; Training Operator v1 is in maintenance)."""
    if choice not in (*APIS, "auto"):
        raise ValueError(f"train api {choice!r}: one of {', '.join(APIS)}, auto")
    kinds = [APIS[choice]] if choice != "auto" else [TRAINJOB, PYTORCHJOB]
    for k in kinds:
        doc = discover(f"/apis/{k.group}/{k.version}")
        if doc and any(r.get("name") == k.plural and r.get("kind") == k.kind for r in doc.get("resources", [])):
            return k
    want = " or ".join(f"{k.kind} ({k.group}/{k.version})" for k in kinds)
    raise RuntimeError(f"the cluster serves no {want}: install the Kubeflow Training Operator v1.9 or Trainer v2.3 "
                       "(or pick --train.api for the one installed)")


class KubeApi:
    """JobApi for one JobKind over the official kubernetes client (in-cluster config, else
    kubeconfig); `discover` for served_kind."""

    def __init__(self, kind: JobKind = PYTORCHJOB):
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.kind = kind
        self.co = client.CustomObjectsApi()
        self.core = client.CoreV1Api()

    def discover(self, path: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.co.api_client.call_api(path, "GET", response_type="object", auth_settings=["BearerToken"],
                                               _return_http_data_only=True)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def create(self, namespace, body):
        from kubernetes.client.exceptions import ApiException

        k = self.kind
        try:
            return self.co.create_namespaced_custom_object(k.group, k.version, namespace, k.plural, body)
        except ApiException as e:
            if e.status == 409:
                raise ApiConflict(str(e)) from None
            raise

    def get(self, namespace, name):
        k = self.kind
        return self.co.get_namespaced_custom_object(k.group, k.version, namespace, k.plural, name)

    def delete(self, namespace, name):
        k = self.kind
        self.co.delete_namespaced_custom_object(k.group, k.version, namespace, k.plural, name)

    def master_logs(self, namespace, name, since_seconds=None):
        pods = self.core.list_namespaced_pod(namespace, label_selector=self.kind.first_pod.format(name=name))
        if not pods.items:
            return ""
        return self.core.read_namespaced_pod_log(pods.items[0].metadata.name, namespace, container=self.kind.container)
