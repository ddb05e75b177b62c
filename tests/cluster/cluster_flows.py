"""Every network flow captioner needs on a cluster, in one place. tests/cluster/test_cluster_integrity.py
checks, for every rendered overlay, that the NetworkPolicies allow each flow that applies and
that every policy rule (peer x port) is used by some flow: nothing else is allowed.

A side is either one of our workloads, named by kind and name as it appears in the render
(its pod labels are read from there, so a label that drifts breaks the flow), or a pod of
another system, named by namespace and labels, or an address outside the cluster. A flow
applies to an overlay when both of its sides exist there (a workload the overlay deletes
takes its flows with it). STEPS is the namespace where Kubeflow Pipelines runs the steps:
`kubeflow` single-user, the profile namespace multi-user.

To add a flow: append a Flow below (e.g. a TensorBoard Deployment reading event files from
MinIO: Flow("tensorboard->minio", Ours("Deployment", "tensorboard"), MINIO, (9000,))).
"""
from __future__ import annotations

from dataclasses import dataclass, field

STEPS = "{steps}"
ANY_PORT = None


@dataclass(frozen=True)
class Ours:
    """Pods of one of our workloads in the render (Deployment, StatefulSet, Job) or made by a
    controller from one of our objects (InferenceService -> predictor pods; TrainingJob ->
    the PyTorchJob/TrainJob pods the train step launches)."""
    kind: str
    name: str = ""


@dataclass(frozen=True)
class Ext:
    """Pods of another system: namespace (STEPS allowed) and labels ({} = any pod there)."""
    namespace: str
    labels: tuple = ()

    @staticmethod
    def of(namespace: str, **labels: str) -> "Ext":
        return Ext(namespace, tuple(sorted(labels.items())))


@dataclass(frozen=True)
class Outside:
    """An address outside the cluster."""
    ip: str


@dataclass(frozen=True)
class Flow:
    name: str
    src: object
    dst: object
    ports: tuple | None  # None: any port
    why: str = field(default="", compare=False)


MINIO, TRITON, WEB = Ours("StatefulSet", "minio"), Ours("Deployment", "triton"), Ours("Deployment", "captioner-web")
TRAINER, PREDICTOR, MINIO_SETUP = Ours("TrainingJob"), Ours("InferenceService", "captioner"), Ours("Job", "minio-users")
TENSORBOARD = Ours("Deployment", "tensorboard")
CAPTIONER_POD = Ext.of("captioner")  # any pod of ours
KFP_STEP = Ext.of(STEPS, **{"pipelines.kubeflow.org/v2_component": "true"})
PROMETHEUS = Ext.of("monitoring", **{"app.kubernetes.io/name": "prometheus"})
KUBE_DNS = Ext.of("kube-system", **{"k8s-app": "kube-dns"})
INGRESS_NGINX = Ext.of("ingress-nginx", **{"app.kubernetes.io/name": "ingress-nginx"})
TRITON_CLIENT = Ext.of("apps", **{"captioner/triton-client": "true"})  # an inference client in any namespace
ACTIVATOR = Ext.of("knative-serving", app="activator")
AUTOSCALER = Ext.of("knative-serving", app="autoscaler")
ISTIO_GATEWAY = Ext.of("istio-system", istio="ingressgateway")  # istio-ingressgateway and knative-local-gateway
INTERNET = Outside("151.101.0.223")  # a public CDN address (pretrained weights, e.g. the Hugging Face hub)

FLOWS = [
    Flow("dns", CAPTIONER_POD, KUBE_DNS, (53,), "every pod resolves Service names"),
    Flow("minio-setup->minio", MINIO_SETUP, MINIO, (9000,), "the Job creating buckets, users and policies"),
    Flow("step->minio", KFP_STEP, MINIO, (9000,), "every pipeline step reads or writes the store"),
    Flow("step->triton", KFP_STEP, TRITON, (8001,), "the deploy step loads new versions (gRPC model control)"),
    Flow("client->triton", TRITON_CLIENT, TRITON, (8000, 8001), "inference clients labelled captioner/triton-client"),
    Flow("web->triton", WEB, TRITON, (8001,), "the gateway's gRPC inference"),
    Flow("triton->minio", TRITON, MINIO, (9000,), "the model repository"),
    Flow("predictor->minio", PREDICTOR, MINIO, (9000,), "KServe's storage initializer copies storageUri"),
    Flow("prometheus->triton", PROMETHEUS, TRITON, (8002,), "Triton's metrics"),
    Flow("prometheus->predictor", PROMETHEUS, PREDICTOR, (8002,), "Triton's metrics in the predictor"),
    Flow("prometheus->web", PROMETHEUS, WEB, (8080,), "the gateway's /metrics"),
    Flow("ingress->web", INGRESS_NGINX, WEB, (8080,), "the public Ingress"),
    Flow("activator->predictor", ACTIVATOR, PREDICTOR, (8012, 8013), "Knative activator -> queue-proxy (HTTP/1, H2C)"),
    Flow("gateway->predictor", ISTIO_GATEWAY, PREDICTOR, (8012, 8013), "Knative ingress -> queue-proxy"),
    Flow("autoscaler->predictor", AUTOSCALER, PREDICTOR, (9090,), "Knative autoscaler scrapes the queue-proxy"),
    Flow("web->predictor", WEB, ISTIO_GATEWAY, (8081,), "the gateway -> knative-local-gateway -> predictor",),
    Flow("trainer->minio", TRAINER, MINIO, (9000,), "datasets in, checkpoints out"),
    Flow("trainer<->trainer", TRAINER, TRAINER, ANY_PORT, "rendezvous (23456 / 29500) and NCCL/gloo on any port"),
    Flow("trainer->internet", TRAINER, INTERNET, (443,), "pretrained weights"),
    Flow("tensorboard->minio", TENSORBOARD, MINIO, (9000,), "TensorBoard reads the runs' event files"),
]
# flows that apply only when a workload exists that is not one of their sides
NEEDS = {"web->predictor": PREDICTOR}
