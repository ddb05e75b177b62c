"""Helpers shared by several test files (fixtures stay in conftest.py): the tiny model
config, a free port, `captioner serve`, `captioner web` and the demo's front door started as
real processes, and the serving tests' clients (a Triton Python model loaded as python_backend
does, raw REST infer requests, Prometheus scrapes)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A model small enough that a training step takes milliseconds on one CPU core.
TINY = [
    "--model.encoder=vit_tiny_patch16_224",
    "--model.encoder_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
    "--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2", "--model.max_len=16",
    "--data.num_workers=0", "--data.val_fraction=0.15", "--data.test_fraction=0.15",
    "--train.batch_size=8", "--train.warmup_steps=5", "--train.log_every=0", "--train.val_max_images=16",
    "--train.lr=2e-3",
]


def tiny_cfg(data: Path, out: Path, *extra: str):
    from captioner.core.config import load_config

    return load_config(None, [*TINY, f"--data.source={data}", f"--train.out_dir={out}", *extra])


def run_cli(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """`python -m captioner ARGS` as a user runs it; output captured as text."""
    return subprocess.run([sys.executable, "-m", "captioner", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_server(url: str, model: str | None, timeout: float = 60.0) -> None:
    import time

    import tritonclient.grpc as grpcclient

    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            c = grpcclient.InferenceServerClient(url)
            if c.is_server_ready() and (model is None or c.is_model_ready(model)):
                return
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"server at {url} not ready after {timeout:.0f}s ({last})")


def start_serve(repo, log_path, *extra: str, ready_model: str | None = "captioner", python: str | None = None):
    """`captioner serve REPO [extra...]` as a real process on 127.0.0.1 and a free port, ready
    (server ready and, unless ready_model is None, that model ready); output goes to log_path.
    The environment is inherited (the package must be importable, as after `pip install -e .`);
    `python` runs it with another interpreter (a venv with only the serving extra)."""
    port = free_port()
    log = open(log_path, "w")
    p = subprocess.Popen([python or sys.executable, "-m", "captioner", "serve", str(repo), "--grpc-port", str(port),
                          *extra],
                         env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{port}"
    try:
        wait_server(url, ready_model)
    except TimeoutError:
        p.kill()
        p.wait()
        raise AssertionError(Path(log_path).read_text()) from None
    return p, url


def start_web(grpc_url: str, log_path: Path, *extra: str, tries: int = 300):
    """`captioner web --url GRPC_URL [extra...]` as a real process on 127.0.0.1 and a free port,
    ready when /healthz answers (polled every 0.1 s, `tries` times) -> (process, base URL)."""
    import time

    import requests

    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "captioner", "web", "--url", grpc_url, "--port", str(port), *extra],
                         env=os.environ.copy(), stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(tries):
        try:
            if requests.get(base + "/healthz", timeout=1).ok:
                return p, base
        except requests.ConnectionError:
            pass
        if p.poll() is not None:
            break
        time.sleep(0.1)
    p.kill()
    raise AssertionError(f"captioner web did not start:\n{Path(log_path).read_text()}")


def start_stack(repo, ports, log_path, env: dict | None = None, tries: int = 600):
    """`python -m captioner.serving.stack REPO GRPC HTTP METRICS WEB` (the front door of `captioner demo
    --serve`) as a real process, waited for until it prints its web page line (polled every 0.2 s,
    `tries` times) or exits -> (process, its output so far). The caller stops it."""
    import time

    p = subprocess.Popen([sys.executable, "-m", "captioner.serving.stack", str(repo), *map(str, ports)],
                         env=env or os.environ.copy(), stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    for _ in range(tries):
        if "web page:" in Path(log_path).read_text() or p.poll() is not None:
            break
        time.sleep(0.2)
    return p, Path(log_path).read_text()


def start_moto(log_path, env: dict | None = None, tries: int = 200):
    """moto_server (a real S3 HTTP server, from the test extra) on 127.0.0.1 and a free port,
    ready when its /moto-api/ answers (polled every 0.1 s, `tries` times) -> (process, port). Its
    access log goes to log_path. The caller stops it."""
    import time
    import urllib.request

    port = free_port()
    p = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                         stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env or os.environ.copy())
    for _ in range(tries):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return p, port
        except OSError:
            if p.poll() is not None:
                raise RuntimeError(f"moto_server exited:\n{Path(log_path).read_text()}") from None
            time.sleep(0.1)
    p.kill()
    raise RuntimeError("moto_server did not start")


def pyproject() -> dict:
    """The [project] table of pyproject.toml."""
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def source_on_path(monkeypatch) -> None:
    """Puts this checkout first on PYTHONPATH for the test's subprocesses (an interpreter that does
    not have the package installed, such as the serve-extra venv, imports it from here)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


class Clock:
    """A fake clock for launcher/rollout tests: `clock()` is now, `clock.sleep(s)` moves it."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def headless_chromium(window: str = "1000,800"):
    """A headless Chromium WebDriver for the page and report tests, or a skip naming the packages
    (.ci/run installs them). The caller quits it."""
    import shutil

    import pytest

    found = next(((shutil.which(b), shutil.which(d)) for b, d in (("chromium", "chromedriver"),
                                                                   ("chromium-browser", "chromedriver"))
                  if shutil.which(b) and shutil.which(d)), None)
    if found is None:
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={window}"):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=Service(found[1]))


# -- serving: Triton Python models, raw REST requests, metrics -----------------------------------
def load_model_py(repo, model, monkeypatch, load=None, version=1):
    """Import <model>/<version>/model.py the way python_backend does, with Triton holding the
    models an explicit-mode load of `load` (default: triton_repo.LOAD_ORDER) gives
    (triton_repo.plan_load); returns its initialized TritonPythonModel."""
    import importlib.util

    from captioner.serving.triton_repo import LOAD_ORDER
    from tests.serving import pb_utils_double

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils",
                        pb_utils_double.make_module(repo, LOAD_ORDER if load is None else load))
    spec = importlib.util.spec_from_file_location(f"triton_{model}", Path(repo) / model / str(version) / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    inst = mod.TritonPythonModel()
    inst.initialize(pb_utils_double.model_args(repo, model, version))
    return inst


def infer_body(images: list[bytes], extra_inputs=(), outputs=None, parameters=None, raw_json=None):
    """A binary-data REST infer request -> (body, headers): IMAGE as binary BYTES, `extra_inputs`
    as JSON tensors; `raw_json` replaces the JSON part as written."""
    import json
    import struct

    from captioner.core import names

    blob = b"".join(struct.pack("<I", len(b)) + b for b in images)
    head = {"inputs": [{"name": names.IMAGE, "datatype": "BYTES", "shape": [len(images), 1],
                        "parameters": {"binary_data_size": len(blob)}}, *extra_inputs]}
    if outputs is not None:
        head["outputs"] = outputs
    if parameters is not None:
        head["parameters"] = parameters
    text = (raw_json or json.dumps(head)).encode()
    return text + blob, {"Inference-Header-Content-Length": str(len(text)), "Content-Type": "application/octet-stream"}


def post(url, body: bytes, headers: dict, timeout=60) -> tuple[int, dict, dict]:
    """POST -> (status, headers, JSON answer, or {"raw": bytes} when it is not JSON)."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), {"raw": r.read()}
    except urllib.error.HTTPError as e:
        raw = e.read() or b"{}"
        try:
            return e.code, dict(e.headers), json.loads(raw)
        except ValueError:
            return e.code, dict(e.headers), {"raw": raw}


def _with_beam(value_json: str) -> str:
    """The request JSON with BEAM_SIZE's data written as raw JSON text (Infinity, 1e308...)."""
    import json

    from captioner.core import names

    head = {"inputs": [{"name": names.IMAGE, "datatype": "BYTES", "shape": [1, 1],
                        "parameters": {"binary_data_size": "__SIZE__"}},
                       {"name": names.BEAM_SIZE, "datatype": "INT32", "shape": [1, 1], "data": ["__BEAM__"]}]}
    return json.dumps(head).replace('["__BEAM__"]', f"[{value_json}]")


def malformed_rest_requests(image: bytes) -> dict:
    """REST infer requests with one malformed or lax value each: {what: ((URL version suffix or
    None, body, headers), the text the 400 answer must contain)}."""
    import json

    from captioner.core import names

    size = len(image) + 4
    big = "1" * 5000

    def raw(text, version=None):
        return version, *infer_body([image], raw_json=text.replace('"__SIZE__"', str(size)))

    def j(version=None, **kw):
        return version, *infer_body([image], **kw)

    return {
        "request parameters a list": (j(parameters=[1]), "request: 'parameters' must be a JSON object"),
        "request parameters a string": (j(parameters="x"), "request: 'parameters' must be a JSON object"),
        "input parameters a list": (raw(json.dumps({"inputs": [{"name": names.IMAGE, "datatype": "BYTES",
                                                                "shape": [1, 1], "parameters": ["x"]}]})),
                                    "input 'IMAGE': 'parameters' must be a JSON object"),
        "output parameters a string": (j(outputs=[{"name": names.CAPTION, "parameters": "binary"}]),
                                       "output 'CAPTION': 'parameters' must be a JSON object"),
        "5000-digit integer": (raw(_with_beam(big)), "integer of 5000 digits"),
        "BEAM_SIZE 2**32+3": (raw(_with_beam(str(2**32 + 3))), "INT32 elements must be integers"),
        "BEAM_SIZE 2**40": (raw(_with_beam(str(2**40))), "INT32 elements must be integers"),
        "BEAM_SIZE Infinity": (raw(_with_beam("Infinity")), "Infinity is not valid JSON"),
        "BEAM_SIZE 1e308": (raw(_with_beam("1e308")), "INT32 elements must be integers"),
        "BEAM_SIZE 3.7": (raw(_with_beam("3.7")), "got 3.7"),
        "BEAM_SIZE true": (raw(_with_beam("true")), "got True"),
        "timeout 1e19": (j(parameters={"timeout": 1e19}), "parameter 'timeout' (microseconds) must be an integer"),
        "timeout 2**65": (j(parameters={"timeout": 2**65}), "parameter 'timeout' (microseconds) must be an integer"),
        "binary_data 'false'": (j(outputs=[{"name": names.CAPTION, "parameters": {"binary_data": "false"}}]),
                                "parameter 'binary_data' must be true or false"),
        "binary_data_output 1": (j(parameters={"binary_data_output": 1}),
                                 "parameter 'binary_data_output' must be true or false"),
        "id an object": (raw(json.dumps({"id": {"a": 1}, "inputs": [{"name": names.IMAGE, "datatype": "BYTES",
                                         "shape": [1, 1], "parameters": {"binary_data_size": size}}]})),
                         "'id' must be a string"),
        "version '  1'": (j(version="%20%201"), "version should be an integral value"),
        "version '-1'": (j(version="-1"), "version should be an integral value"),
        "version 'abc'": (j(version="abc"), "version should be an integral value"),
    }


def scrape(url) -> tuple[dict, dict]:
    """(samples {(name, labels...): value}, types {name: type}) of Triton's families, parsed from
    the text as Prometheus reads it (a sample's name must be its family's name)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    samples = {}
    for name, labels, value in re.findall(r"^(nv_\w+)\{([^}]*)\} (\S+)$", text, re.M):
        samples[(name, tuple(sorted(re.findall(r'(\w+)="([^"]*)"', labels))))] = float(value)
    return samples, types


def total(samples, name, model: str | None = None) -> float:
    """The sum of a family's samples for `model` (default: the ensemble)."""
    from captioner.core import names

    model = model or names.ENSEMBLE
    return sum(v for (n, labels), v in samples.items() if n == name and ("model", model) in labels)


class Served:
    """A `captioner serve` process started by the serving tests' `server` fixture, with its HTTP/REST
    and metrics ports: `grpc` and `http_host` are HOST:PORT, `http` and `metrics` URLs."""

    def __init__(self, proc, grpc_url: str, http_port: int, metrics_port: int, log: Path):
        self.proc, self.grpc, self.log = proc, grpc_url, log
        self.port, self.mport = http_port, metrics_port
        self.http_host = f"127.0.0.1:{http_port}"
        self.http = f"http://{self.http_host}"
        self.metrics = f"http://127.0.0.1:{metrics_port}/metrics"


# ------------------------------------------------------------------ probe files (images, ingest options)
def jpeg_bytes(color=(200, 30, 30), size=(32, 32), **save) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95, **save)
    return buf.getvalue()


def files_under(p: Path) -> set:
    return {x.relative_to(p).as_posix() for x in p.rglob("*")} if p.exists() else set()


def left_red_right_blue(w=64, h=32):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), (20, 40, 230))
    ImageDraw.Draw(img).rectangle([0, 0, w // 2 - 1, h - 1], fill=(230, 20, 20))
    return img


def with_exif(img, orientation: int = 6, gps: bool = False, fmt: str = "JPEG") -> bytes:
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    if gps:
        exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)}
    buf = io.BytesIO()
    img.save(buf, fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))
    return buf.getvalue()


def ingest_opts(**kw):
    """Ingest options for the generated set: small shards, all three splits, no progress bars."""
    from captioner.data.ingest import IngestOptions

    return IngestOptions(**{"shard_mb": 0.05, "workers": 4, "progress": False, "val_fraction": 0.15,
                            "test_fraction": 0.15, **kw})


def probe_opts(**kw):
    """Ingest options for a hand-made probe set: one shard, every item in train, no progress bars."""
    from captioner.data.ingest import IngestOptions

    return IngestOptions(**{"shard_mb": 1, "workers": 2, "progress": False, "val_fraction": 0.0,
                            "test_fraction": 0.0, **kw})


def save_screenshot(driver, path: Path) -> None:
    """Keep a screenshot of what the browser showed, for a person to look at (its path is printed)."""
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 0
    print(f"screenshot: {path}")


def assert_ports_closed(ports) -> None:
    """Nothing answers on any of these ports of 127.0.0.1 any more."""
    import pytest
    import requests

    for port in ports:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/", timeout=5)


def stop_processes(*procs) -> None:
    """Kill and reap each process that is still running (a test's servers, whatever the test did)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
