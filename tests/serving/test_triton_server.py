"""The exported repository on the real tritonserver (2.51.0, release 24.10, from the nvidia-pytriton
wheel; captioner.serving.triton_server runs it with the cluster's flags) and `captioner serve` held to it.

Skips, naming the reason, where the wheel's server cannot run (not Linux x86_64 with glibc >=
2.35, no network to fetch the wheel the first time, no shared-libpython Python with venv).
One server (explicit model control, restricted model-repository protocol) is shared by the
module; the mode-none, S3 and NumPy-2 checks start their own.
"""
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from captioner.core import names
from captioner.core.decoding import DecodeParams
from captioner.core.deployment import CONTROL_HEADER, CONTROL_KEY_ENV, TRITON_SERVER_VERSION, control_headers
from captioner.data.samples import sample_images
from captioner.modeling.checkpoint import load_checkpoint
from captioner.modeling.inference import caption_tensor
from captioner.serving import triton_repo
from captioner.serving.client import caption_bytes
from captioner.serving.core import image_bytes_to_pixels
from tests.helpers import ROOT, assert_ports_closed, free_port, start_moto, start_serve, start_stack, stop_processes

pytestmark = pytest.mark.slow
S3_FIXTURE = ROOT / "tests" / "fixtures" / "s3_requests" / "triton.json"
REGENERATE = os.environ.get("CAPTIONER_REGENERATE_FIXTURES") == "1"


@pytest.fixture(scope="session")
def triton_prepared():
    """The wheel, the models' environment and a Python for the stub, from the cache (built on
    first use: a download of 55 MB and a pip install)."""
    from captioner.serving import triton_server
    why = triton_server.why_not_here()
    if why:
        pytest.skip(f"real Triton: {why}")
    try:
        return triton_server.prepare()
    except triton_server.TritonUnavailable as e:
        pytest.skip(f"real Triton: {e}")


def _start(prepared, repo, run_dir, key, **kw):
    from captioner.serving import triton_server
    return triton_server.start(repo, run_dir, key, prepared=prepared, **kw)


@pytest.fixture(scope="module")
def key():
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def triton(triton_prepared, exported_repo, tmp_path_factory, key):
    """tritonserver over a serving folder holding the exported repository as version 1,
    started exactly as k8s/base/triton.yaml starts it (explicit, `captioner` loaded, restricted)."""
    from captioner.io.storage import open_store

    serving = tmp_path_factory.mktemp("triton-serving") / "serving"
    triton_repo.publish_version(exported_repo[0], open_store(str(serving), create=True))
    s = _start(triton_prepared, serving, tmp_path_factory.mktemp("triton-run"), key)
    s.wait_ready(models=(names.ENSEMBLE,))
    s.serving = serving
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(triton, tmp_path_factory, key):
    """`captioner serve` over the same serving folder, with the same control flags (and HTTP)."""
    http = free_port()
    p, url = start_serve(triton.serving, tmp_path_factory.mktemp("local") / "serve.log", "--model-control-mode",
                         "explicit", "--load-model", names.ENSEMBLE, "--grpc-restricted-protocol",
                         f"model-repository:{CONTROL_HEADER}={key}", "--http-port", str(http))
    yield url
    p.terminate()
    p.wait(timeout=30)


@pytest.fixture(scope="module")
def ck(trained_run):
    return load_checkpoint(trained_run.out_dir)


@pytest.fixture(scope="module")
def images(ck):
    return [b for _, b in sample_images(ck.config.data, 6)]


def _reference(ck, imgs, beam=1, max_tokens=None):
    pixels = torch.from_numpy(image_bytes_to_pixels(np.array(imgs, dtype=object), ck.preprocess))
    p = DecodeParams(strategy="beam" if beam > 1 else "greedy", beam_size=beam,
                     max_new_tokens=max_tokens or ck.model.cfg.max_new_tokens)
    return caption_tensor(ck.model, ck.tokenizer, pixels, p)


# ------------------------------------------------------------------ answers compared field by field
def test_metadata_config_index_and_readiness_match_captioner_serve(triton, local, key):
    """Before any deploy: both serve version 1 of the same repository with the same flags.
    Model config: Triton answers its auto-completed config (core src/model_config_utils.cc
    NormalizeModelConfig / the backend's auto-complete); `captioner serve` answers the same
    (captioner.serving.triton_repo.autocomplete), except `runtime: model.py` which only the Python-based
    onnxruntime backend of the test server adds (README: differences table)."""
    from google.protobuf.json_format import MessageToDict

    a, b = grpcclient.InferenceServerClient(triton.url), grpcclient.InferenceServerClient(local)
    for m in (names.ENSEMBLE, names.PREPROCESS, names.ENCODER, names.DECODE_LOOP):
        assert MessageToDict(a.get_model_metadata(m)) == MessageToDict(b.get_model_metadata(m)), m
        real = MessageToDict(a.get_model_config(m).config)
        if real.get("backend") == "onnxruntime":
            assert real.pop("runtime") == "model.py"  # the Python-based onnxruntime backend's mark
        assert real == MessageToDict(b.get_model_config(m).config), m
    for m in (*triton_repo.ALL_MODELS, "nope"):
        assert a.is_model_ready(m) == b.is_model_ready(m), m
    assert a.is_server_ready() and b.is_server_ready()
    h = control_headers(key)
    assert MessageToDict(a.get_model_repository_index(headers=h)) == MessageToDict(
        b.get_model_repository_index(headers=h))


def test_metric_families_cover_the_adapter_rule_and_the_hpa(triton, images):
    """Every nv_* name the prometheus-adapter rule reads exists on the real server after a
    load and a request, and the rule produces the HPA's metric name."""
    caption_bytes(triton.url, images[:1])
    want = r'nv_inference_request_success\{model="captioner",version="1"\} [1-9]'
    for _ in range(50):  # the counters reach /metrics a moment after the answer
        text = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
        if re.search(want, text):
            break
        time.sleep(0.2)
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    rule = yaml.safe_load((ROOT / "k8s" / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"][0]
    used = set(re.findall(r"nv_[a-z_]+", rule["seriesQuery"] + rule["metricsQuery"]))
    assert used and used <= families, used - families
    hpa = next(d for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "triton.yaml").read_text())
               if d and d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]
    assert re.search(want, text), text


# ------------------------------------------------------------------ captions
def test_captions_equal_pytorch_greedy_and_beam_also_in_shared_batches(triton, ck, images):
    want = _reference(ck, images)
    assert caption_bytes(triton.url, images) == want  # one request of 6
    assert [caption_bytes(triton.url, [b])[0] for b in images] == want
    assert caption_bytes(triton.url, images[:3], beam=3) == _reference(ck, images[:3], beam=3)
    # requests with different settings merged into the same dynamic batches
    jobs = [(i % len(images), beam, mt) for i, (beam, mt) in
            enumerate([(1, None), (2, None), (3, None), (5, None), (1, 3), (3, 3)] * 2)]
    alone = {j: _reference(ck, [images[j[0]]], j[1], j[2])[0] for j in set(jobs)}
    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(lambda j: caption_bytes(triton.url, [images[j[0]]], beam=j[1], max_tokens=j[2])[0], jobs))
    assert got == [alone[j] for j in jobs]


# ------------------------------------------------------------------ error codes: real server vs captioner serve
def _bytes_tensor(items):
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _png(w, h):
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, "PNG")
    return buf.getvalue()


def _hostile(good):
    img = lambda *bs: (names.IMAGE, "BYTES", [len(bs), 1], _bytes_tensor(bs))  # noqa: E731
    i32 = lambda n, v: (n, "INT32", [1, 1], struct.pack("<i", v))  # noqa: E731
    return {
        "empty image": (names.ENSEMBLE, [img(b"")]),
        "random bytes": (names.ENSEMBLE, [img(np.random.default_rng(0).bytes(5000))]),
        "truncated image": (names.ENSEMBLE, [img(good[: len(good) // 2])]),
        "100 megapixels": (names.ENSEMBLE, [img(_png(10000, 10000))]),
        "BEAM_SIZE 0": (names.ENSEMBLE, [img(good), i32(names.BEAM_SIZE, 0)]),
        "BEAM_SIZE 100": (names.ENSEMBLE, [img(good), i32(names.BEAM_SIZE, 100)]),
        "MAX_TOKENS 0": (names.ENSEMBLE, [img(good), i32(names.MAX_TOKENS, 0)]),
        "MAX_TOKENS 100": (names.ENSEMBLE, [img(good), i32(names.MAX_TOKENS, 100)]),
        "FP32 image": (names.ENSEMBLE, [(names.IMAGE, "FP32", [1, 1], b"\0\0\0\0")]),
        "shape [1, 2]": (names.ENSEMBLE, [(names.IMAGE, "BYTES", [1, 2], _bytes_tensor([good, good]))]),
        "batch 9 > max 8": (names.ENSEMBLE, [img(*[good] * 9)]),
        "missing IMAGE": (names.ENSEMBLE, [i32(names.BEAM_SIZE, 1)]),
        "unknown model": ("nope", [img(good)]),
        "length prefix over the data": (names.ENSEMBLE, [(names.IMAGE, "BYTES", [1, 1],
                                                         struct.pack("<I", 1000) + b"only ten b")]),
        "half a length prefix": (names.ENSEMBLE, [(names.IMAGE, "BYTES", [1, 1], b"\x05\x00")]),
        "two elements for [1, 1]": (names.ENSEMBLE, [(names.IMAGE, "BYTES", [1, 1], _bytes_tensor([good, good]))]),
    }


def _infer_status(url, model, tensors) -> tuple[str, str]:
    with grpc.insecure_channel(url) as ch:
        req = service_pb2.ModelInferRequest(model_name=model)
        for name, dt, shape, raw in tensors:
            req.inputs.add(name=name, datatype=dt, shape=shape)
            req.raw_input_contents.append(raw)
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=60)
            return "OK", ""
        except grpc.RpcError as e:
            return e.code().name, e.details()


def test_hostile_requests_get_the_same_codes_from_both_servers(triton, local, images):
    """Every request error from our Python models carries Triton's code (INVALID_ARG for bad
    input; python_backend's default is INTERNAL), and `captioner serve` answers each hostile
    request with the code the real server gives."""
    got = {case: (_infer_status(triton.url, m, t)[0], _infer_status(local, m, t)[0])
           for case, (m, t) in _hostile(images[0]).items()}
    want = {case: "NOT_FOUND" if case == "unknown model" else "INVALID_ARGUMENT" for case in got}
    assert {c: r for c, (r, _) in got.items()} == want
    assert {c: s for c, (_, s) in got.items()} == want
    assert caption_bytes(triton.url, images[:1]) == caption_bytes(local, images[:1])  # both still serve
def test_web_gateway_behind_the_real_server_reports_a_bad_image_per_image(triton, images, tmp_path):
    """`captioner web` in front of tritonserver: a bad upload is that image's error and the other
    image is captioned (while the models answered INTERNAL the gateway gave 502 for the request)."""
    import requests

    port = free_port()
    with open(tmp_path / "web.log", "w") as log:
        p = subprocess.Popen([sys.executable, "-m", "captioner", "web", "--url", triton.url, "--port", str(port)],
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if requests.get(base + "/healthz", timeout=2).ok:
                    break
            except requests.ConnectionError:
                assert p.poll() is None, (tmp_path / "web.log").read_text()
                time.sleep(0.1)
        r = requests.post(base + "/api/caption", files=[("files", ("good.jpg", images[0], "image/jpeg")),
                                                        ("files", ("bad.jpg", b"not an image", "image/jpeg"))],
                          timeout=120)
        assert r.status_code == 200, r.text
        good, bad = r.json()["results"]
        assert good["caption"] == caption_bytes(triton.url, images[:1])[0]
        assert "not a recognised image format" in bad["error"], bad
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_demo_front_door_serves_page_and_metrics_from_the_real_server(triton_prepared, exported_repo, images,
                                                                     tmp_path):
    """`captioner demo --serve`'s front door (captioner.serving.stack) picks the real server where it runs:
    the page captions through it and the printed metrics URL is tritonserver's own, which counts
    each model of the ensemble (`captioner serve`'s /metrics has no rows for `encoder`)."""
    import signal

    import requests

    repo, _ = exported_repo
    ports = dict(zip(("grpc", "http", "metrics", "web"), (free_port() for _ in range(4))))
    log = tmp_path / "stack.log"
    p, out = start_stack(repo, ports.values(), log, tries=900)
    try:
        metrics = f"http://127.0.0.1:{ports['metrics']}/metrics"
        assert metrics in out, out
        page = f"http://127.0.0.1:{ports['web']}/"
        r = requests.post(page + "api/caption", files=[("files", ("a.jpg", images[0], "image/jpeg"))], timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["caption"] == caption_bytes(f"127.0.0.1:{ports['grpc']}", images[:1])[0]
        want = r'nv_inference_request_success\{model="encoder",version="1"\} [1-9]'
        for _ in range(50):  # the counters reach /metrics a moment after the answer
            text = requests.get(metrics, timeout=10).text
            if re.search(want, text):
                break
            time.sleep(0.2)
        assert re.search(want, text), text[-3000:]
        assert f"with tritonserver {TRITON_SERVER_VERSION} (nvidia-pytriton wheel)" in out, out
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 0, log.read_text()
        assert f"stopped captioner web and tritonserver {TRITON_SERVER_VERSION}" in log.read_text()
        assert_ports_closed(ports.values())
    finally:
        stop_processes(p)


def _counts(url):
    st = grpcclient.InferenceServerClient(url).get_inference_statistics()
    return {(m.name, m.version): (m.inference_count, m.execution_count) for m in st.model_stats}


def test_statistics_count_every_model_of_the_ensemble_as_triton_does(triton, local, images):
    """Sequential requests (one per dynamic batch): each composing model counts its own
    inferences (batch items) and executions, on both servers (`captioner serve` used to count
    the ensemble only: 0/0 for preprocess, encoder and decode_loop)."""
    before = {u: _counts(u) for u in (triton.url, local)}
    for batch in ([images[0]], [images[1]], [images[2], images[3]]):
        for u in (triton.url, local):
            caption_bytes(u, batch)
    delta = {}
    for u in (triton.url, local):
        after = _counts(u)
        delta[u] = {k[0]: (after[k][0] - before[u].get(k, (0, 0))[0], after[k][1] - before[u].get(k, (0, 0))[1])
                    for k in after if k[0] != names.ENSEMBLE}
    assert delta[triton.url] == {names.PREPROCESS: (4, 3), names.ENCODER: (4, 3), names.DECODE_LOOP: (4, 3)}
    assert delta[local] == delta[triton.url]


# ------------------------------------------------------------------ the restricted control API and the deploy step
def test_deploy_step_publishes_and_loads_through_the_restricted_api(triton, local, exported_repo, images, key,
                                                                   monkeypatch):
    """The deploy step, unchanged, publishes version N+1 and loads it on the real server; the
    header is 'triton-grpc-protocol-<name>' over gRPC and the bare name over HTTP (server
    src/grpc/grpc_server.h kRestrictedProtocolHeaderTemplate, src/http_server.cc)."""
    from captioner.pipeline.steps import deploy_step

    c = grpcclient.InferenceServerClient(triton.url)
    for bad in (None, {CONTROL_HEADER: key}, control_headers("wrong", "grpc")):
        with pytest.raises(InferenceServerException) as e:
            c.load_model(names.ENSEMBLE, headers=bad)
        assert e.value.status() == "StatusCode.UNAVAILABLE", e.value
        assert f"expecting header 'triton-grpc-protocol-{CONTROL_HEADER}'" in e.value.message()
    h = httpclient.InferenceServerClient(triton.http_url)
    for bad in (None, control_headers(key, "grpc"), control_headers("wrong", "http")):
        with pytest.raises(InferenceServerException) as e:
            h.get_model_repository_index(headers=bad)
        assert e.value.status() == "403", e.value
    assert {m["name"] for m in h.get_model_repository_index(headers=control_headers(key, "http"))} >= {
        names.ENSEMBLE, names.DECODER}

    before = max(int(m.version) for m in c.get_model_repository_index(headers=control_headers(key)).models
                 if m.name == names.ENSEMBLE and m.version)
    monkeypatch.setenv(CONTROL_KEY_ENV, key)
    r = deploy_step(str(exported_repo[0]), str(triton.serving), 1.5, triton_url=triton.url)
    assert r["version"] == before + 1 and r["replicas"] == [triton.url]
    assert c.is_model_ready(names.ENSEMBLE, str(before + 1))
    assert caption_bytes(triton.url, images[:1]) == caption_bytes(local, images[:1])
    # over HTTP with the bare name: the same load is accepted
    h.load_model(names.ENSEMBLE, headers=control_headers(key, "http"))
    assert h.is_model_ready(names.ENSEMBLE, str(before + 1))


# ------------------------------------------------------------------ every exported variant, mode none and explicit
@pytest.fixture(scope="module", params=["fp32", "int8", "fp16-step"])
def variant(request, exported_repo, trained_run, tmp_path_factory):
    if request.param == "fp32":
        return request.param, exported_repo[0]
    from captioner.export.exporter import export

    out = tmp_path_factory.mktemp(f"repo-{request.param}") / "models"
    kw = {"quantize": "int8"} if request.param == "int8" else {"decoder_dtype": "float16"}
    export(str(trained_run.out_dir / "ckpt_best.pt"), str(out), device="cpu", verify=False, **kw)
    return request.param, out


def _served_by_captioner_serve(repo, imgs, beams=(1, 3)) -> dict:
    """{beam: captions} from `captioner serve`'s repository runner over `repo`, in process."""
    from captioner.serving.server.runtime import Repository

    r = Repository(repo, control="explicit", load=[names.ENSEMBLE])
    try:
        return {beam: [c.decode() for c in r.run(names.ENSEMBLE, {
            names.IMAGE: np.array([[b] for b in imgs], dtype=object),
            names.BEAM_SIZE: np.full((len(imgs), 1), beam, np.int32)})[names.CAPTION].reshape(-1)] for beam in beams}
    finally:
        r.close()


def test_each_variant_loads_in_mode_none_and_explicit_with_the_same_captions(
        variant, triton, triton_prepared, ck, images, key, tmp_path, monkeypatch):
    """Mode none loads every model of the variant (the decoder too); the deploy step loads the
    variant on the explicit-mode server as a new version; both caption greedy and beam 3 as
    `captioner serve` does over the same repository (and fp32 as PyTorch does)."""
    from captioner.pipeline.steps import deploy_step

    kind, repo = variant
    want = _served_by_captioner_serve(repo, images[:3])
    if kind == "fp32":
        assert want == {b: _reference(ck, images[:3], beam=b) for b in (1, 3)}
    with _start(triton_prepared, repo, tmp_path / "none", key, mode="none") as s:
        s.wait_ready(models=triton_repo.ALL_MODELS)
        idx = grpcclient.InferenceServerClient(s.url).get_model_repository_index(headers=control_headers(key))
        assert {(m.name, m.state) for m in idx.models} == {(m, "READY") for m in triton_repo.ALL_MODELS}
        assert {b: caption_bytes(s.url, images[:3], beam=b) for b in (1, 3)} == want
    monkeypatch.setenv(CONTROL_KEY_ENV, key)
    r = deploy_step(str(repo), str(triton.serving), 1.0, triton_url=triton.url)
    assert grpcclient.InferenceServerClient(triton.url).is_model_ready(names.ENSEMBLE, str(r["version"]))
    assert {b: caption_bytes(triton.url, images[:3], beam=b) for b in (1, 3)} == want


# ------------------------------------------------------------------ the repository read from S3
def s3_requests(log_text: str) -> list[dict]:
    """The S3 requests in moto_server's access log (werkzeug: `"GET /path?query HTTP/1.1" 200`),
    path-style (bucket first), each once, in the order first made."""
    out = []
    for method, target in re.findall(r'"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]"', log_text):
        u = urllib.parse.urlsplit(target)
        if u.path.startswith("/moto-api"):
            continue
        req = {"method": method, "path": urllib.parse.unquote(u.path),
               "query": dict(sorted(urllib.parse.parse_qsl(u.query, keep_blank_values=True)))}
        if req not in out:
            out.append(req)
    return out


def test_repository_is_loaded_from_s3_with_the_manifest_env_and_its_requests_are_recorded(
        triton_prepared, exported_repo, images, key, tmp_path, monkeypatch):
    """The repository published to the S3 stand-in, loaded by tritonserver from
    s3://127.0.0.1:PORT/bucket/prefix with the AWS_* variables k8s/base/triton.yaml sets. The
    requests it makes are kept in tests/fixtures/s3_requests/triton.json (the MinIO policy
    check's input); CAPTIONER_REGENERATE_FIXTURES=1 rewrites that file from this run."""
    from captioner.io.storage import open_store

    log = tmp_path / "moto.log"
    moto, port = start_moto(log)
    try:
        manifest = next(d for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "triton.yaml").read_text())
                        if d and d["kind"] == "Deployment")
        env_names = [e["name"] for e in manifest["spec"]["template"]["spec"]["containers"][0]["env"]
                     if e["name"].startswith("AWS_")]
        assert sorted(env_names) == ["AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION", "AWS_SECRET_ACCESS_KEY"]
        env = {"AWS_ACCESS_KEY_ID": "captioner-triton", "AWS_SECRET_ACCESS_KEY": uuid.uuid4().hex,
               "AWS_DEFAULT_REGION": "us-east-1"}
        for k, v in {**env, "CAPTIONER_S3_ENDPOINT": f"127.0.0.1:{port}"}.items():
            monkeypatch.setenv(k, v)
        clean = tmp_path / "repo"  # without the __pycache__ folders other tests' imports of model.py leave
        shutil.copytree(exported_repo[0], clean, ignore=shutil.ignore_patterns("__pycache__"))
        triton_repo.publish_version(clean, open_store("s3://models/serving", create=True))
        start_at = len(log.read_text())
        with _start(triton_prepared, f"s3://127.0.0.1:{port}/models/serving", tmp_path / "run", key, env=env) as s:
            s.wait_ready(models=(names.ENSEMBLE,))
            assert caption_bytes(s.url, images[:1])[0]
        recorded = s3_requests(log.read_text()[start_at:])
    finally:
        moto.kill()
        moto.wait()
    assert {"method": "GET", "path": f"/models/serving/{names.ENSEMBLE}/config.pbtxt", "query": {}} in recorded
    from captioner.core.deployment import TRITON_SERVER_VERSION

    if REGENERATE or not S3_FIXTURE.exists():
        S3_FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        S3_FIXTURE.write_text(json.dumps({
            "component": "triton",
            "source": f"recorded from tritonserver {TRITON_SERVER_VERSION} (nvidia-pytriton wheel) loading "
                      f"s3://HOST:PORT/models/serving in explicit mode (--load-model=captioner) from moto_server's "
                      f"request log (the probes for libtriton_python.so in the encoder's folders come from the test "
                      f"server's Python-based onnxruntime backend): tests/serving/test_triton_server.py, "
                      f"CAPTIONER_REGENERATE_FIXTURES=1",
            "requests": recorded}, indent=1) + "\n")
    kept = json.loads(S3_FIXTURE.read_text())
    assert kept["component"] == "triton"
    # the set of requests (their order varies with Triton's parallel model loads)
    key_of = lambda r: (r["method"], r["path"], tuple(sorted(r["query"].items())))  # noqa: E731
    assert sorted(map(key_of, recorded)) == sorted(map(key_of, kept["requests"])), \
        "tritonserver's S3 requests changed: rerun with CAPTIONER_REGENERATE_FIXTURES=1 and review the MinIO policy"


# ------------------------------------------------------------------ the stub and NumPy 2
IDENTITY_CONFIG = """name: "identity"
backend: "python"
max_batch_size: 0
input [ { name: "X", data_type: TYPE_FP32, dims: [ 4 ] }, { name: "S", data_type: TYPE_STRING, dims: [ 1 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ 4 ] }, { name: "T", data_type: TYPE_STRING, dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""
IDENTITY_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy()),
            pb_utils.Tensor("T", pb_utils.get_input_tensor_by_name(r, "S").as_numpy())]) for r in requests]
"""


def _identity(url):
    x = grpcclient.InferInput("X", [4], "FP32")
    x.set_data_from_numpy(np.array([1.5, 2.25, -3.0, 4.0], np.float32))
    t = grpcclient.InferInput("S", [1], "BYTES")
    t.set_data_from_numpy(np.array([b"a caption"], dtype=object))
    try:
        r = grpcclient.InferenceServerClient(url).infer("identity", [x, t])
        return r.as_numpy("Y").tolist(), r.as_numpy("T").tolist()
    except InferenceServerException as e:
        return str(e)


def test_the_stub_needs_numpy_1_and_the_built_environment_has_it(triton_prepared, tmp_path, key):
    """python_backend's stub in this release mis-reads NumPy 2 arrays; the environment
    captioner.serving.triton_server builds (numpy<2) passes an FP32 and a BYTES tensor through intact."""
    import sysconfig

    repo = tmp_path / "repo"
    (repo / "identity" / "1").mkdir(parents=True)
    (repo / "identity" / "config.pbtxt").write_text(IDENTITY_CONFIG)
    (repo / "identity" / "1" / "model.py").write_text(IDENTITY_MODEL)
    want = ([1.5, 2.25, -3.0, 4.0], [b"a caption"])
    with _start(triton_prepared, repo, tmp_path / "np1", key, mode="none") as s:
        s.wait_ready(models=("identity",))
        assert _identity(s.url) == want
    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip(f"this environment has NumPy {np.__version__}: nothing to show the NumPy-2 failure with")
    if triton_prepared["version"] != "%d.%d" % sys.version_info[:2]:
        pytest.skip(f"the stub runs Python {triton_prepared['version']}, this environment's NumPy 2 is built for "
                    f"{sys.version_info[0]}.{sys.version_info[1]}")
    with _start(triton_prepared, repo, tmp_path / "np2", key, mode="none",
                site_packages=[sysconfig.get_paths()["purelib"]]) as s:  # this project's NumPy 2
        s.wait_ready(models=("identity",))
        assert _identity(s.url) != want


# ------------------------------------------------------------------ repositories Triton refuses
def test_a_repository_triton_refuses_is_refused_by_captioner_serve_the_same_way(triton_prepared, key, tmp_path):
    """Explicit loads of broken models: `captioner serve` answers each with the real server's
    status code and its reason's words (the real server's answer is the reference, not ours)."""
    from tritonclient.grpc import model_config_pb2 as mc

    S, V = mc.ModelEnsembling.Step, mc.ModelVersionPolicy

    def cfg(name, **kw):
        return triton_repo.config_text(mc.ModelConfig(name=name, backend="python", max_batch_size=1, **kw))

    repo = tmp_path / "repo"
    files = {
        "wrongname/config.pbtxt": cfg("other"), "wrongname/1/model.py": "",
        "noversion/config.pbtxt": cfg("noversion", version_policy=V(specific=V.Specific(versions=[2]))),
        "noversion/1/model.py": "",
        "ens/config.pbtxt": triton_repo.config_text(mc.ModelConfig(
            name="ens", platform="ensemble", max_batch_size=1,
            ensemble_scheduling=mc.ModelEnsembling(step=[S(model_name="missing", model_version=-1)]))),
        "ens/1/README.md": "",
        "badtext/config.pbtxt": "name: 'badtext' bogus_field: 1", "badtext/1/model.py": "",
    }
    for f, text in files.items():
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        (repo / f).write_text(text)
    p, url = start_serve(repo, tmp_path / "serve.log", "--model-control-mode", "explicit",
                         "--grpc-restricted-protocol", f"model-repository:{CONTROL_HEADER}={key}", ready_model=None)
    try:
        with _start(triton_prepared, repo, tmp_path / "run", key) as s:
            for m in ("wrongname", "noversion", "ens", "badtext"):
                answers = []
                for u in (s.url, url):
                    with pytest.raises(InferenceServerException) as e:
                        grpcclient.InferenceServerClient(u).load_model(m, headers=control_headers(key))
                    answers.append((e.value.status(), e.value.message().strip()))
                (real_code, real_msg), (code, msg) = answers
                assert code == real_code and msg.startswith(real_msg), (m, answers)
    finally:
        p.terminate()
        p.wait(timeout=30)
