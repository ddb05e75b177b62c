"""`captioner web` as a real process in front of a real `captioner serve`: the JSON API, its
limits and upstream errors, its metrics, and the page driven in a real headless Chromium."""
import os
from pathlib import Path

import pytest
import requests

from captioner.data.samples import sample_images
from captioner.modeling.checkpoint import load_checkpoint
from captioner.serving.client import caption_bytes
from tests.helpers import (assert_ports_closed, free_port, headless_chromium, save_screenshot, start_serve, start_stack,
                           start_web, stop_processes)

MAX_IMAGES, MAX_BODY = 3, 200_000


@pytest.fixture(scope="module")
def stack(exported_repo, tmp_path_factory):
    repo, _ = exported_repo
    d = tmp_path_factory.mktemp("web")
    serve, grpc_url = start_serve(repo, d / "serve.log")
    web, base = start_web(grpc_url, d / "web.log", "--max-images", str(MAX_IMAGES), "--max-body", str(MAX_BODY))
    yield {"grpc": grpc_url, "web": base, "serve_proc": serve, "web_proc": web}
    stop_processes(web, serve)


@pytest.fixture(scope="module")
def images(trained_run):
    return sample_images(load_checkpoint(trained_run.out_dir).config.data, 3)  # held-out (test split) images


def _files(items):
    return [("files", (name, data, "image/jpeg")) for name, data in items]


def test_api_captions_equal_the_model_servers(stack, images):
    r = requests.post(stack["web"] + "/api/caption", files=_files(images[:2]), timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    assert [x["filename"] for x in got["results"]] == [n for n, _ in images[:2]]
    assert [x["caption"] for x in got["results"]] == [caption_bytes(stack["grpc"], [b])[0] for _, b in images[:2]]
    r = requests.post(stack["web"] + "/api/caption", files=_files(images[:1]), data={"beam": "3"}, timeout=60)
    assert r.json()["results"][0]["caption"] == caption_bytes(stack["grpc"], [images[0][1]], beam=3)[0]


def test_rejected_image_gets_its_own_error(stack, images):
    r = requests.post(stack["web"] + "/api/caption", files=_files([images[0], ("notes.jpg", b"not an image")]),
                      timeout=60)
    assert r.status_code == 200, r.text
    ok, bad = r.json()["results"]
    assert ok["caption"] and "error" not in ok
    assert bad["filename"] == "notes.jpg" and "not a recognised image format" in bad["error"], bad


@pytest.mark.parametrize("case,status,needle", [
    ("too-many", 400, f"at most {MAX_IMAGES}"),
    ("too-large", 413, f"over the limit of {MAX_BODY} bytes"),
    ("no-files", 400, "no images"),
    ("bad-beam", 400, "beam must be between 1 and 8"),
])
def test_limits(stack, images, case, status, needle):
    files, data = _files(images[:1]), {}
    if case == "too-many":
        files = _files(images[:1] * (MAX_IMAGES + 1))
    elif case == "too-large":
        files = _files([("big.jpg", b"\xff" * (MAX_BODY + 1))])
    elif case == "no-files":
        files, data = None, {"beam": "1"}
    elif case == "bad-beam":
        data = {"beam": "99"}
    r = requests.post(stack["web"] + "/api/caption", files=files, data=data, timeout=60)
    assert r.status_code == status and needle in r.json()["detail"], (r.status_code, r.text)
    assert stack["web_proc"].poll() is None


def test_health_ready_docs_and_metrics(stack, images):
    assert requests.get(stack["web"] + "/healthz").json() == {"status": "ok"}
    assert requests.get(stack["web"] + "/readyz").json() == {"ready": True}
    spec = requests.get(stack["web"] + "/openapi.json").json()
    body = spec["paths"]["/api/caption"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["files"]["type"] == "array"
    assert requests.get(stack["web"] + "/docs").status_code == 200
    requests.post(stack["web"] + "/api/caption", files=_files(images[:1]), timeout=60)
    requests.post(stack["web"] + "/api/caption", data={"beam": "1"}, timeout=60)  # 400
    text = requests.get(stack["web"] + "/metrics").text
    assert 'captioner_web_requests_total{method="POST",route="/api/caption",status="200"}' in text
    assert 'captioner_web_errors_total{status="400"}' in text
    assert 'captioner_web_request_duration_seconds_count{route="/api/caption"}' in text


def test_model_server_down_or_not_ready(exported_repo, tmp_path, images):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens here
    web, base = start_web(dead, tmp_path / "web-dead.log")
    try:
        assert requests.get(base + "/healthz").status_code == 200  # the gateway itself is alive
        r = requests.get(base + "/readyz")  # the reason, never the model server's internal address
        assert r.status_code == 503 and "unreachable" in r.json()["reason"] and dead not in r.text, r.text
        r = requests.post(base + "/api/caption", files=_files(images[:1]), timeout=60)
        assert r.status_code == 502 and "unreachable" in r.json()["detail"] and dead not in r.text, r.text
    finally:
        web.kill()
        web.wait()
    repo, _ = exported_repo  # a model server up, with the model not loaded
    serve, url = start_serve(repo, tmp_path / "serve.log", "--model-control-mode", "explicit", ready_model=None)
    web, base = start_web(url, tmp_path / "web-notready.log")
    try:
        r = requests.get(base + "/readyz")
        assert r.status_code == 503 and "model 'captioner' is not ready" in r.json()["reason"], r.text
        r = requests.post(base + "/api/caption", files=_files(images[:1]), timeout=60)
        assert r.status_code == 503 and "no ready model" in r.json()["detail"], r.text
    finally:
        for p in (web, serve):
            p.kill()
            p.wait()


def test_page_in_headless_chromium(stack, images, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    name, data = images[0]
    img = tmp_path / Path(name).name
    img.write_bytes(data)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a picture")
    want = requests.post(stack["web"] + "/api/caption", files=_files([(img.name, data)]), timeout=60)
    want = want.json()["results"][0]["caption"]

    driver = headless_chromium("1000,800")
    try:
        driver.get(stack["web"] + "/")
        assert driver.find_element(By.CSS_SELECTOR, "label[for=files]").text  # the file input has a label
        driver.find_element(By.ID, "files").send_keys(f"{img}\n{bad}")
        driver.find_element(By.ID, "submit").click()
        wait = WebDriverWait(driver, 60)
        cap = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#results .caption")))
        err = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#results .error[role=alert]")))
        assert cap.text == want
        assert "broken.jpg" in err.text and "not a recognised image format" in err.text, err.text
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "1 captioned, 1 rejected"))
        save_screenshot(driver, tmp_path / "page.png")
    finally:
        driver.quit()


def test_demo_serve_keeps_both_running_until_ctrl_c(exported_repo, tmp_path, images):
    """`captioner demo --serve`'s last step (captioner.serving.stack) where the real Triton server cannot
    run (switched off here; tests/serving/test_triton_server.py has the real one): the reason, then
    `captioner serve` + web up, URLs printed, Ctrl-C stops both."""
    import signal

    repo, _ = exported_repo
    ports = [str(free_port()) for _ in range(4)]
    log = tmp_path / "stack.log"
    p, out = start_stack(repo, ports, log, env={**os.environ, "CAPTIONER_TRITON": "off"})
    try:
        page = f"http://127.0.0.1:{ports[3]}/"
        assert f"web page:     {page}" in out and f"http://127.0.0.1:{ports[1]}/v2" in out, out
        assert "Caption your images" in requests.get(page, timeout=10).text
        r = requests.post(page + "api/caption", files=_files(images[:1]), timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["caption"]
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 0, log.read_text()
        out = log.read_text()
        assert "CAPTIONER_TRITON=off switches the real server off); serving with `captioner serve`" in out, out
        assert f"serving {repo} with `captioner serve`" in out and "stopped captioner web and `captioner serve`" in out
        assert_ports_closed(ports)
    finally:
        stop_processes(p)
