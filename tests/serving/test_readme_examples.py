"""The README's curl examples (fenced blocks after `<!-- readme-example: NAME -->`) run as written,
ports substituted, against `captioner serve --http-port --metrics-port` and `captioner web`."""
import json
import re
import shutil
import subprocess

import pytest

from captioner.data.samples import sample_images
from captioner.modeling.checkpoint import load_checkpoint
from captioner.serving.client import caption_bytes
from tests.helpers import ROOT, free_port, start_serve, start_web

EXAMPLES = dict(re.findall(r"<!-- readme-example: (\S+) -->\n```bash\n(.*?)```", (ROOT / "README.md").read_text(),
                           re.S))


def test_the_readme_has_every_example():
    assert set(EXAMPLES) == {"health", "infer-binary", "metrics", "gateway"}, sorted(EXAMPLES)


@pytest.fixture(scope="module")
def stack(exported_repo, trained_run, tmp_path_factory):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    repo, _ = exported_repo
    d = tmp_path_factory.mktemp("readme")
    hp, mp = free_port(), free_port()
    serve, grpc_url = start_serve(repo, d / "serve.log", "--http-port", str(hp), "--metrics-port", str(mp))
    web, base = start_web(grpc_url, d / "web.log")
    img = sample_images(load_checkpoint(trained_run.out_dir).config.data, 1)[0][1]  # a held-out demo image
    (d / "shapes.jpg").write_bytes(img)
    ports = {"8000": str(hp), "8002": str(mp), "8080": base.rsplit(":", 1)[1]}
    yield {"dir": d, "ports": ports, "grpc": grpc_url, "img": img}
    for p in (web, serve):
        p.kill()
        p.wait()


def run_example(stack, name: str) -> str:
    script = re.sub(r"localhost:(8000|8002|8080)\b", lambda m: f"127.0.0.1:{stack['ports'][m.group(1)]}",
                    EXAMPLES[name])
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=stack["dir"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"README example {name!r} failed:\n{script}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_health_example(stack):
    out = run_example(stack, "health")
    assert out.startswith("ready\n")
    assert json.loads(out.split("\n", 1)[1])["name"] == "captioner"


def test_binary_infer_example_returns_the_grpc_caption(stack):
    res = json.loads(run_example(stack, "infer-binary"))
    assert res["outputs"][0]["name"] == "CAPTION"
    assert res["outputs"][0]["data"] == [caption_bytes(stack["grpc"], [stack["img"]])[0]]


def test_metrics_example_shows_the_requests(stack):
    run_example(stack, "infer-binary")
    lines = run_example(stack, "metrics").splitlines()
    ok = [ln for ln in lines if ln.startswith('nv_inference_request_success{model="captioner",version="1"}')]
    assert ok and float(ok[0].split()[-1]) >= 1, lines


def test_gateway_example_returns_the_grpc_caption(stack):
    ready, answer = run_example(stack, "gateway").splitlines()
    assert json.loads(ready) == {"ready": True}
    res = json.loads(answer)
    assert res["beam"] == 3
    assert res["results"] == [{"filename": "shapes.jpg", "caption": caption_bytes(stack["grpc"], [stack["img"]],
                                                                                   beam=3)[0]}]
