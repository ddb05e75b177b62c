"""Strict validators for the vendored CRDs of k8s/crds/ (unknown fields rejected), from
`spec.versions[name=V].schema.openAPIV3Schema`. Each CRD is read from ../shared/schemas/ when
that folder is beside the checkout (tests check the vendored copy equals it), else from the
vendored copy, so a clone anywhere runs them."""
from __future__ import annotations

import functools

import jsonschema
import yaml

from tests.cluster.test_k8s import _strict
from tests.helpers import ROOT

SHARED, VENDORED = ROOT.parent / "shared" / "schemas", ROOT / "k8s" / "crds"
TRAINJOB_CRD = "trainer.kubeflow.org_trainjobs.v2.3.0.yaml"
RUNTIME_CRD = "trainer.kubeflow.org_clustertrainingruntimes.v2.3.0.yaml"
TORCH_RUNTIME = "torch-distributed-runtime.v2.3.0.yaml"
ISVC_CRD = "serving.kserve.io_inferenceservices.v0.19.0.yaml"
SERVINGRUNTIME_CRD = "serving.kserve.io_servingruntimes.v0.19.0.yaml"
TRITON_RUNTIME = "kserve-tritonserver-runtime.v0.19.0.yaml"
VENDORED_FILES = (TRAINJOB_CRD, RUNTIME_CRD, TORCH_RUNTIME, ISVC_CRD, SERVINGRUNTIME_CRD, TRITON_RUNTIME)


def path(name: str):
    return SHARED / name if (SHARED / name).exists() else VENDORED / name


def load(name: str) -> dict:
    return yaml.safe_load(path(name).read_text())


@functools.lru_cache(maxsize=None)
def validator(name: str, version: str) -> jsonschema.Draft7Validator:
    crd = load(name)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(_strict(schema))


def errors(obj: dict, name: str, version: str) -> list[str]:
    return [f"{'.'.join(map(str, e.path))}: {e.message}"
            for e in sorted(validator(name, version).iter_errors(obj), key=lambda e: list(e.path))]


def trainjob_errors(obj: dict) -> list[str]:
    return errors(obj, TRAINJOB_CRD, "v1alpha1")


def isvc_errors(obj: dict) -> list[str]:
    return errors(obj, ISVC_CRD, "v1beta1")
