"""KServe v0.19.0 InferenceService on our `captioner-triton` ServingRuntime (Serverless mode): a pure builder and a
canary rollout (new model version at `canaryTrafficPercent`, wait for its revision, live check
through the v2 endpoint, promote to 100% or roll back). The champion is recorded by the caller
only after promotion.

How KServe behaves (github.com/kserve/kserve, tag v0.19.0), which the rollout relies on and
tests/cluster/test_kserve.py's fake follows:
- pkg/controller/v1beta1/inferenceservice/reconcilers/knative/ksvc_reconciler.go: with
  `canaryTrafficPercent` set and a `latestRolledoutRevision` known, traffic is
  [{latestRevision: true, percent: X (tag "latest" with the serving.kserve.io/enable-tag-routing
  annotation)}, {revisionName: <latestRolledoutRevision>, percent: 100-X, tag: "prev"}];
  without it (or on the first rollout) 100% goes to the latest revision. Knative routes a
  `latestRevision: true` target to the latest *ready* revision.
- pkg/apis/serving/v1beta1/inference_service_status.go PropagateStatus: latestCreatedRevision /
  latestReadyRevision are copied from the Knative Service; latestRolledoutRevision becomes the
  latest ready revision only once it gets 100% (the old one moves to previousRolledoutRevision).
- KServe docs "Canary Rollout" (docs/modelserving/v1beta1/rollout/canary.md): promote by
  removing canaryTrafficPercent; roll back by setting canaryTrafficPercent to 0, which sends
  all traffic back to the previously rolled-out revision.
- The runtime: KServe's kserve-tritonserver (config/runtimes/kserve-tritonserver.yaml) starts
  `tritonserver --model-store=/mnt/models --grpc-port=9000 --http-port=8080` (model control
  mode none: every model in the folder is loaded) on nvcr.io/nvidia/tritonserver:23.05-py3
  (config/runtimes/kustomization.yaml), an image without our Python models' dependencies; we
  name our own ServingRuntime `captioner-triton` instead (k8s/overlays/kserve/servingruntime.yaml:
  the same arguments on the captioner Triton image). The storage initializer copies
  `storageUri` to /mnt/models using the service account's S3 Secret (annotations
  serving.kserve.io/s3-endpoint, s3-usehttps, s3-region; keys AWS_ACCESS_KEY_ID/SECRET); it
  lists with `Prefix=<path>` (python/storage/kserve_storage/kserve_storage.py _download_s3),
  so the URI ends in "/" or sibling prefixes (serving-old/) would be copied too.
- Canary traffic splits and latestRolledoutRevision exist only in Serverless mode (Knative;
  ksvc_reconciler.go); a cluster whose default is RawDeployment would ignore
  canaryTrafficPercent, so the mode is pinned with the serving.kserve.io/deploymentMode
  annotation. With the gRPC port named h2c, Knative sends activator/gateway traffic to the
  queue-proxy's HTTP/2 port 8013 (knative serving pkg/reconciler/revision/resources/queue.go).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
# our ServingRuntime (namespace of the InferenceService), k8s/overlays/kserve; not KServe's own
# "kserve-tritonserver", which runs Triton 23.05
RUNTIME = "captioner-triton"
DEPLOYMENT_MODE = ("serving.kserve.io/deploymentMode", "Serverless")  # canary rollouts need Knative
MODEL_FORMAT = {"name": "triton", "version": "2"}  # a format the runtime lists (supportedModelFormats)
ISVC_NAME, SERVICE_ACCOUNT = "captioner", "captioner-kserve"
S3_SECRET = "captioner-kserve-s3"  # Triton's read-only MinIO user, in KServe's key names (k8s/overlays/kserve)
TAG_ROUTING = "serving.kserve.io/enable-tag-routing"
MODEL_VERSION_ENV = "CAPTIONER_MODEL_VERSION"  # changes with every release: a new Knative revision
DEFAULT_CANARY_PERCENT = 10


@dataclass
class IsvcSpec:
    storage_uri: str
    version: int
    name: str = ISVC_NAME
    namespace: str = "captioner"
    gpus: int = 1
    cpu: str = "4"
    memory: str = "16Gi"
    min_replicas: int = 1
    max_replicas: int = 4
    target_concurrency: int = 8  # autoscaling target: in-flight requests per replica
    service_account: str = SERVICE_ACCOUNT
    canary_percent: int | None = None


def build_inferenceservice(s: IsvcSpec) -> dict:
    if not s.storage_uri.startswith(("s3://", "gs://", "pvc://", "https://")):
        raise ValueError(f"storageUri {s.storage_uri!r} must be a URI the storage initializer can copy (s3://...)")
    storage_uri = s.storage_uri.rstrip("/") + "/"  # the storage initializer lists with Prefix=<path>
    if not 1 <= s.min_replicas <= s.max_replicas:
        raise ValueError(f"replicas: need 1 <= min {s.min_replicas} <= max {s.max_replicas}")
    limits = {"cpu": s.cpu, "memory": s.memory}
    if s.gpus:
        limits["nvidia.com/gpu"] = str(s.gpus)
    predictor = {
        "serviceAccountName": s.service_account,
        # the base NetworkPolicies let pods labelled triton reach MinIO (storage initializer)
        "labels": {"app.kubernetes.io/name": "triton", "app.kubernetes.io/component": "kserve-predictor"},
        "minReplicas": s.min_replicas,
        "maxReplicas": s.max_replicas,
        "scaleMetric": "concurrency",
        "scaleTarget": s.target_concurrency,
        "model": {
            "modelFormat": dict(MODEL_FORMAT),
            "runtime": RUNTIME,
            "protocolVersion": "v2",
            "storageUri": storage_uri,
            "env": [{"name": MODEL_VERSION_ENV, "value": str(s.version)}],
            "resources": {"limits": limits, "requests": dict(limits)},
            "ports": [{"name": "h2c", "containerPort": 9000, "protocol": "TCP"}],  # the v2 gRPC endpoint
        },
    }
    if s.canary_percent is not None:
        if not 0 <= s.canary_percent <= 100:
            raise ValueError(f"canaryTrafficPercent must be 0..100, got {s.canary_percent}")
        predictor["canaryTrafficPercent"] = s.canary_percent
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": s.name, "namespace": s.namespace,
                     "labels": {"app.kubernetes.io/part-of": "captioner"},
                     "annotations": {TAG_ROUTING: "true", DEPLOYMENT_MODE[0]: DEPLOYMENT_MODE[1]}},
        "spec": {"predictor": predictor},
    }


class IsvcApi(Protocol):
    def get(self, namespace: str, name: str) -> dict | None: ...  # None: not found
    def create(self, namespace: str, body: dict) -> dict: ...
    def patch(self, namespace: str, name: str, patch: dict) -> dict: ...  # JSON merge patch


class RolloutFailed(RuntimeError):
    """The canary was rolled back; the message says why."""


def predictor_status(isvc: dict) -> dict:
    return ((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}


def _ready(isvc: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (isvc.get("status") or {}).get("conditions") or [])


def _wait(api: IsvcApi, ns: str, name: str, what: str, ok: Callable[[dict], bool], timeout_s: float, poll_s: float,
          clock, sleep) -> dict:
    start = clock()
    while True:
        cur = api.get(ns, name) or {}
        if ok(cur):
            return cur
        if clock() - start > timeout_s:
            st = predictor_status(cur)
            raise TimeoutError(f"InferenceService {ns}/{name}: {what} not reached after {timeout_s:.0f}s "
                               f"(latestCreated {st.get('latestCreatedRevision')}, latestReady "
                               f"{st.get('latestReadyRevision')}, traffic {st.get('traffic')})")
        sleep(poll_s)


def canary_target(isvc: dict) -> dict | None:
    """The traffic target of the latest revision (the canary while a split is on)."""
    return next((t for t in predictor_status(isvc).get("traffic") or [] if t.get("latestRevision")), None)


def rollout(api: IsvcApi, spec: IsvcSpec, live_check: Callable[[dict], None], percent: int = DEFAULT_CANARY_PERCENT,
            timeout_s: float = 900.0, poll_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> dict:
    """Roll spec (a new model version) out. The first rollout has no previous revision to
    split with: it gets 100% once ready. Later ones go out at `percent`; when the new
    revision is the latest ready one and receives its share, `live_check(isvc)` runs against
    it (raise to refuse); then promote (canaryTrafficPercent removed, wait until it is the
    latestRolledoutRevision) or roll back (canaryTrafficPercent 0, wait until the previous
    revision has 100%) and raise RolloutFailed. Returns {revision, previous, isvc}."""
    ns, name = spec.namespace, spec.name
    cur = api.get(ns, name)
    if cur is None or not predictor_status(cur).get("latestRolledoutRevision"):
        body = build_inferenceservice(IsvcSpec(**{**spec.__dict__, "canary_percent": None}))
        if cur is None:
            api.create(ns, body)
        else:
            api.patch(ns, name, {"metadata": {"annotations": body["metadata"]["annotations"]}, "spec": body["spec"]})
        log.info("InferenceService %s/%s: first rollout of version %d at 100%%", ns, name, spec.version)
        done = _wait(api, ns, name, "first revision ready with 100% traffic",
                     lambda o: _ready(o) and bool(predictor_status(o).get("latestRolledoutRevision")),
                     timeout_s, poll_s, clock, sleep)
        live_check(done)  # nothing to roll back to: a failure leaves the service as it is and no champion
        return {"revision": predictor_status(done)["latestRolledoutRevision"], "previous": None, "isvc": done}

    prev = predictor_status(cur)["latestRolledoutRevision"]
    body = build_inferenceservice(IsvcSpec(**{**spec.__dict__, "canary_percent": percent}))
    api.patch(ns, name, {"metadata": {"annotations": body["metadata"]["annotations"]}, "spec": body["spec"]})
    log.info("InferenceService %s/%s: version %d out as a canary at %d%% (previous revision %s)", ns, name,
             spec.version, percent, prev)

    def canary_ready(o: dict) -> bool:
        st, t = predictor_status(o), canary_target(o)
        return (bool(st.get("latestReadyRevision")) and st.get("latestReadyRevision") != prev
                and st.get("latestReadyRevision") == st.get("latestCreatedRevision")
                and t is not None and t.get("revisionName") == st["latestReadyRevision"]
                and t.get("percent") == percent)

    try:
        cur = _wait(api, ns, name, f"canary revision ready with {percent}% traffic", canary_ready, timeout_s, poll_s,
                    clock, sleep)
        revision = predictor_status(cur)["latestReadyRevision"]
        live_check(cur)
    except Exception as e:  # noqa: BLE001 - any failure before promotion rolls back
        log.warning("InferenceService %s/%s: rolling back to %s: %s", ns, name, prev, e)
        api.patch(ns, name, {"spec": {"predictor": {"canaryTrafficPercent": 0}}})
        _wait(api, ns, name, f"all traffic back on {prev}",
              lambda o: any(t.get("revisionName") == prev and t.get("percent") == 100
                            for t in predictor_status(o).get("traffic") or []),
              timeout_s, poll_s, clock, sleep)
        raise RolloutFailed(f"version {spec.version} rolled back to revision {prev}: {e}") from e
    api.patch(ns, name, {"spec": {"predictor": {"canaryTrafficPercent": None}}})  # promote: 100% to latest
    done = _wait(api, ns, name, f"{revision} rolled out",
                 lambda o: predictor_status(o).get("latestRolledoutRevision") == revision, timeout_s, poll_s,
                 clock, sleep)
    log.info("InferenceService %s/%s: promoted %s (version %d) to 100%%", ns, name, revision, spec.version)
    return {"revision": revision, "previous": prev, "isvc": done}


# ------------------------------------------------------------------ the live check
def grpc_target(url: str, port: int | None = None) -> str:
    """HOST:PORT for tritonclient's gRPC from a traffic target's URL (http://host[:port])."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    if not u.hostname:
        raise ValueError(f"InferenceService URL {url!r} has no host")
    return f"{u.hostname}:{port or u.port or (443 if u.scheme == 'https' else 80)}"


def expected_captions(repo: str, images: list[bytes]) -> list[str]:
    """Greedy captions of `images` by the exported repository itself (onnxruntime on its
    encoder/decoder, its preprocess and decode settings): what the live service must say."""
    from pathlib import Path

    import numpy as np

    from captioner.core.names import DECODE_LOOP, PREPROCESS
    from captioner.serving.core import DecodeLoop, image_bytes_to_pixels, load_preprocess, params_for
    from captioner.serving.onnx_runtime import OrtCaptioner

    ort = OrtCaptioner(repo)
    pre = load_preprocess(Path(repo) / PREPROCESS / "1")
    loop = DecodeLoop.in_process(Path(repo) / DECODE_LOOP / "1")  # the served path: decode_loop's own decoder
    arr = np.empty(len(images), dtype=object)
    arr[:] = images
    _, cross = ort.run_encoder(image_bytes_to_pixels(arr, pre))
    return loop.caption(cross, params_for(1, None, loop.s))


def live_check(url: str, images: list[bytes], want: list[str], timeout: float = 60.0) -> None:
    """Caption `images` through the v2 (gRPC) endpoint at url; raise unless they equal `want`."""
    from captioner.serving.client import caption_bytes, wait_ready

    wait_ready(url, timeout=timeout)
    got = caption_bytes(url, images)
    if list(got) != list(want):
        raise RuntimeError(f"live check at {url}: captions differ from the exported model's: got {got}, want {want}")
    log.info("live check at %s: %d captions match the exported model", url, len(got))


class KubeIsvcApi:
    """IsvcApi over the official kubernetes client."""

    def __init__(self):
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.co = client.CustomObjectsApi()

    def get(self, namespace, name):
        from kubernetes.client.exceptions import ApiException

        try:
            return self.co.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def create(self, namespace, body):
        return self.co.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def patch(self, namespace, name, patch):
        return self.co.api_client.call_api(
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}", "PATCH", body=patch,
            header_params={"Content-Type": "application/merge-patch+json", "Accept": "application/json"},
            response_type="object", auth_settings=["BearerToken"], _return_http_data_only=True)
