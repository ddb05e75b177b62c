"""Lean serving: what the Triton Python models and `captioner serve` import needs
neither torch nor the ONNX export code, the `serve` extra installs no such thing, and the
Triton image installs the serving extra only."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from captioner.core import names
from captioner.core.deployment import TRITON_ONNXRUNTIME
from tests.helpers import ROOT, pyproject, source_on_path, start_serve

HEAVY = ("torch", "torchvision", "timm", "onnx", "onnxscript", "transformers", "captioner.export.exporter",
         "captioner.modeling.model", "captioner.training.train", "captioner.modeling.checkpoint", "captioner.modeling.inference")

IMPORTS = textwrap.dedent("""
    import importlib.util, json, sys, types
    sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
    what = sys.argv[1]
    if what.endswith(".py"):  # a Python-backend model file, loaded the way python_backend does
        spec = importlib.util.spec_from_file_location("model", what)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    elif what == "cli-serve":  # `captioner serve` through the whole CLI path, on a missing repository
        from captioner.cli.main import main
        try:
            main(["serve", sys.argv[2]])
        except SystemExit as e:  # refused with a message: it ran the whole command
            assert e.code not in (0, None), e.code
    else:
        importlib.import_module(what)
    print(json.dumps(sorted(sys.modules)))
""")


@pytest.mark.parametrize("what", ["captioner.serving.server.app", "captioner.serving.core", "captioner.serving.onnx_runtime",
                                  "captioner.serving.triton_repo", "captioner.serving.client", "cli-serve",
                                  "captioner/serving/triton/decode_loop.py", "captioner/serving/triton/preprocess.py"])
def test_serving_path_imports_no_torch_or_export_code(what, tmp_path):
    arg = str(ROOT / what) if what.endswith(".py") else what
    r = subprocess.run([sys.executable, "-c", IMPORTS, arg, str(tmp_path / "missing")], capture_output=True,
                       text=True, timeout=120,
                       env=os.environ.copy(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    heavy = sorted(m for m in loaded if m in HEAVY or m.split(".")[0] in HEAVY)
    assert not heavy, f"importing {what} loads {heavy[:10]}"


# What the web gateway's image lacks (docker/web.Dockerfile): the gateway, the HTTP front it borrows
# its listener from and the wire codec must import without them, and without the server's runtime.
GATEWAY_LACKS = ("torch", "onnxruntime", "tokenizers", "timm", "onnx", "captioner.serving.core",
                 "captioner.serving.server.runtime", "captioner.serving.server.batching",
                 "captioner.serving.server.app")


@pytest.mark.parametrize("what", ["captioner.web.gateway", "captioner.serving.server.http",
                                  "captioner.serving.server.codec"])
def test_gateway_path_imports_no_tokenizers_or_onnxruntime(what):
    code = ("import importlib, json, sys\nfor m in ('torch', 'onnxruntime', 'tokenizers'):\n    sys.modules[m] = None\n"
            f"importlib.import_module({what!r})\n"
            "print(json.dumps(sorted(m for m, v in sys.modules.items() if v is not None)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=os.environ.copy(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m in GATEWAY_LACKS or m.split(".")[0] in GATEWAY_LACKS], what


def _req_name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()


@pytest.mark.parametrize("extra", ["serve", "serve-gpu"])
def test_serving_extras_pull_no_training_stack(extra):
    p = pyproject()
    reqs = {_req_name(r) for r in p["dependencies"] + p["optional-dependencies"][extra]}
    assert not reqs & {"torch", "torchvision", "timm", "onnx", "onnxscript", "transformers", "kfp"}, reqs
    assert "onnxruntime" in reqs or "onnxruntime-gpu" in reqs


def test_triton_image_installs_only_the_serving_extra():
    """decode_loop runs the decoder in process on the GPU: the image needs onnxruntime-gpu,
    pinned to the onnxruntime of Triton's own onnxruntime backend (the graphs are checked
    against that version in test_triton_onnxruntime.py)."""
    docker = (ROOT / "docker" / "triton.Dockerfile").read_text()
    installs = re.findall(r"pip install ([^\n\\]+)", docker)
    assert installs == ['--no-cache-dir "./[serve-gpu]"'], installs
    assert f"onnxruntime-gpu=={TRITON_ONNXRUNTIME}" in pyproject()["optional-dependencies"]["serve-gpu"]
    # Triton 24.10's Python-backend stub (pybind11 v2.10.0) mis-reads NumPy 2 arrays: the image holds NumPy 1
    assert "numpy>=1.24,<2" in pyproject()["optional-dependencies"]["serve-gpu"]
    assert set(pyproject()["optional-dependencies"]["test"][0].split("[")[1].rstrip("]").split(",")) >= {"serve",
                                                                                                         "train"}


def test_lean_venv_has_no_torch(lean_python):
    for mod in ("torch", "onnx", "timm"):
        r = subprocess.run([lean_python, "-c", f"import {mod}"], capture_output=True, text=True)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, f"{mod} is importable in the lean venv"


def test_serve_captions_from_a_venv_without_torch(lean_python, exported_repo, trained_run, tmp_path, monkeypatch):
    """`captioner serve` run by the lean venv's Python (the package from this checkout via
    PYTHONPATH), queried with tritonclient: the same captions as the in-process decode loop here."""
    from captioner.data.samples import sample_images
    from captioner.modeling.checkpoint import load_checkpoint
    from captioner.serving.client import caption_bytes
    from captioner.serving.core import DecodeLoop, image_bytes_to_pixels, params_for
    from captioner.serving.onnx_runtime import OrtCaptioner

    repo, _ = exported_repo
    ck = load_checkpoint(trained_run.out_dir)
    imgs = [b for _, b in sample_images(ck.config.data, 3)]
    source_on_path(monkeypatch)  # the lean venv imports this checkout's captioner
    p, url = start_serve(repo, tmp_path / "lean.log", python=lean_python)
    try:
        got = caption_bytes(url, imgs)
    finally:
        p.terminate()
        p.wait(timeout=30)
    _, cross = OrtCaptioner(repo).run_encoder(image_bytes_to_pixels(np.array(imgs, dtype=object), ck.preprocess))
    loop = DecodeLoop.in_process(repo / names.DECODE_LOOP / "1")
    assert got == loop.caption(cross, params_for(None, None, loop.s))
