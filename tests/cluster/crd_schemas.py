"""Strict validators for the vendored CRDs of k8s/crds/ (unknown fields rejected), from
`spec.versions[name=V].schema.openAPIV3Schema`. Each CRD is read from ../shared/schemas/ when
that folder is beside the checkout (tests check the vendored copy equals it), else from the
vendored copy, so a clone anywhere runs them."""
from __future__ import annotations

import functools

import jsonschema
import yaml

from tests.helpers import ROOT

SHARED, VENDORED = ROOT.parent / "shared" / "schemas", ROOT / "k8s" / "crds"
PYTORCHJOB_CRD = "kubeflow.org_pytorchjobs.v1.9.0.yaml"
TRAINJOB_CRD = "trainer.kubeflow.org_trainjobs.v2.3.0.yaml"
RUNTIME_CRD = "trainer.kubeflow.org_clustertrainingruntimes.v2.3.0.yaml"
TORCH_RUNTIME = "torch-distributed-runtime.v2.3.0.yaml"
ISVC_CRD = "serving.kserve.io_inferenceservices.v0.19.0.yaml"
SERVINGRUNTIME_CRD = "serving.kserve.io_servingruntimes.v0.19.0.yaml"
TRITON_RUNTIME = "kserve-tritonserver-runtime.v0.19.0.yaml"
VENDORED_FILES = (TRAINJOB_CRD, RUNTIME_CRD, TORCH_RUNTIME, ISVC_CRD, SERVINGRUNTIME_CRD, TRITON_RUNTIME)


def strict(schema):
    """The CRD's openAPIV3Schema as JSON Schema that rejects unknown fields."""
    if isinstance(schema, dict):
        s = {k: strict(v) for k, v in schema.items()}
        if s.get("type") == "object" and "properties" in s and "additionalProperties" not in s \
                and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        if s.get("x-kubernetes-int-or-string"):
            s.pop("type", None)
            s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return s
    if isinstance(schema, list):
        return [strict(x) for x in schema]
    return schema


def path(name: str):
    return SHARED / name if (SHARED / name).exists() else VENDORED / name


def load(name: str) -> dict:
    return yaml.safe_load(path(name).read_text())


@functools.lru_cache(maxsize=None)
def validator(name: str, version: str) -> jsonschema.Draft7Validator:
    crd = load(name)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(strict(schema))


def errors(obj: dict, name: str, version: str) -> list[str]:
    return [f"{'.'.join(map(str, e.path))}: {e.message}"
            for e in sorted(validator(name, version).iter_errors(obj), key=lambda e: list(e.path))]


def trainjob_errors(obj: dict) -> list[str]:
    return errors(obj, TRAINJOB_CRD, "v1alpha1")


def isvc_errors(obj: dict) -> list[str]:
    return errors(obj, ISVC_CRD, "v1beta1")


def check_pytorchjob(job: dict, validator: jsonschema.Draft7Validator) -> None:
    """The PyTorchJob passes the Training Operator v1.9.0 CRD (unknown fields rejected) and its webhook's rules."""
    from captioner.cluster.pytorchjob import webhook_errors

    errs = sorted(validator.iter_errors(job), key=lambda e: list(e.path))
    assert not errs, [f"{list(e.path)}: {e.message}" for e in errs][:5]
    assert webhook_errors(job) == []
