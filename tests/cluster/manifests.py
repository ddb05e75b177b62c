"""The rendered install: `kubectl kustomize` of each overlay of k8s/ (cached per overlay) and the
Kubernetes version whose strict schemas kubernetes-validate checks objects against. Used by the
manifest, access, Triton, web, KServe, MinIO and integrity tests."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

K8S = ROOT / "k8s"
# the kserve overlays replace the Triton Deployment: tests/cluster/test_kserve.py renders and checks them
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml") if "kserve" not in p.parent.name)
ALL_OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))


def k8s_version() -> str:
    import kubernetes_validate

    d = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    vs = sorted((tuple(int(x) for x in p.name[1:].split("-")[0].split(".")) for p in d.glob("v*-local-strict")))
    return ".".join(map(str, vs[-1]))


_RENDER_CACHE: dict = {}


def render(overlay: str) -> list[dict]:
    """`kubectl kustomize` of an overlay, from a copy of k8s/ whose credentials were made by
    k8s/base/secrets/generate.sh (as an install does; none are committed)."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl (with built-in kustomize) is not installed: cannot render the overlays")
    if overlay not in _RENDER_CACHE:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="captioner-k8s-"))
        shutil.copytree(K8S, tmp / "k8s", ignore=shutil.ignore_patterns("*.env"))
        for script in ("base/secrets/generate.sh", "overlays/kserve/secrets/generate.sh"):  # as an install does
            if (tmp / "k8s" / script).exists():
                subprocess.run(["sh", str(tmp / "k8s" / script)], check=True, capture_output=True)
        r = subprocess.run([kubectl, "kustomize", str(tmp / "k8s" / "overlays" / overlay)], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        _RENDER_CACHE[overlay] = r.stdout
        shutil.rmtree(tmp)
    return [d for d in yaml.safe_load_all(_RENDER_CACHE[overlay]) if d]
