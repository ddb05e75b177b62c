"""One launcher for both Kubeflow training APIs: build the job with the chosen API's builder
(`training_job`), create it, follow its conditions and the first node's log, re-attach on 409
(a KFP retry of the same run), delete it at the end. Before any of it the pipeline asks the
cost guard (`check_cost`).

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
from typing import Callable, Protocol

from captioner.cluster import pytorchjob, trainjob
from captioner.cluster.jobspec import APIS, KINDS, PYTORCHJOB, TRAINJOB, JobKind, JobSpec, training_spec
from captioner.core.cost import CostEstimate

log = logging.getLogger(__name__)


# What each API's admission webhook would refuse, checked before anything is created.
WEBHOOK_ERRORS: dict[str, Callable[[dict], list[str]]] = {PYTORCHJOB.kind: pytorchjob.webhook_errors,
                                                          TRAINJOB.kind: trainjob.webhook_errors}
BUILDERS: dict[str, Callable[[JobSpec], dict]] = {PYTORCHJOB.api: pytorchjob.build_pytorchjob,
                                                  TRAINJOB.api: trainjob.build_trainjob}


def training_job(name: str, config: str, overrides: list[str], model_uri: str, *, api: str = "pytorchjob",
                 **spec) -> dict:
    """The training job for one run, as the pipeline's train step and `captioner job render`
    both build it: a PyTorchJob (api="pytorchjob") or a Trainer v2 TrainJob on the
    torch-distributed runtime (api="trainjob"), from one JobSpec (`jobspec.training_spec`:
    `spec` are its keyword arguments). Refused here if the API's webhook would refuse it."""
    s = training_spec(name, config, overrides, model_uri, **spec)
    if api not in BUILDERS:
        raise ValueError(f"training api {api!r}: one of {', '.join(BUILDERS)}")
    job = BUILDERS[api](s)
    errs = WEBHOOK_ERRORS[job["kind"]](job)
    if errs:
        raise ValueError(f"{job['kind']} {name} would be rejected: {'; '.join(errs)}")
    return job


# ------------------------------------------------------------------ cost guard
class CostLimitExceeded(RuntimeError):
    pass


def check_cost(est: CostEstimate, max_cost: float, override: bool = False) -> None:
    """Refuse to launch a run whose estimate (captioner.core.cost) is over the limit, unless overridden."""
    log.info("cost guard: %s (limit $%.2f)", est.text(), max_cost)
    if est.cost > max_cost and not override:
        raise CostLimitExceeded(f"refusing to launch: {est.text()} exceeds max_cost ${max_cost:,.2f} "
                                "(raise max_cost or pass the override)")


# ------------------------------------------------------------------ launcher
def kind_of(job: dict) -> JobKind:
    k = job.get("kind")
    if k not in KINDS or job.get("apiVersion") != KINDS[k].api_version:
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
    errs = WEBHOOK_ERRORS[k.kind](job)
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
