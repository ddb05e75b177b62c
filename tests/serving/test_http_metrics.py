"""`captioner serve --http-port --metrics-port` as a real process: Triton's HTTP/REST API driven by
tritonclient.http and raw HTTP (binary-data extension: triton-inference-server/server
docs/protocol/extension_binary_data.md; statuses: src/http_server.cc HttpCodeFromError), and
Triton's Prometheus metrics (docs/user_guide/metrics.md) scraped after load."""
import json
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from captioner.core import names
from captioner.data.samples import sample_images
from captioner.modeling.checkpoint import load_checkpoint
from captioner.serving.client import caption_bytes
from tests.helpers import scrape, total

FAMILIES = ["nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
            "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
            "nv_inference_compute_infer_duration_us"]


@pytest.fixture(scope="module")
def images(trained_run):
    return [b for _, b in sample_images(load_checkpoint(trained_run.out_dir).config.data, 4)]


def _http_caption(url, imgs, binary_in=True, binary_out=True, beam=None):
    c = httpclient.InferenceServerClient(url)
    arr = np.array(imgs, dtype=object).reshape(-1, 1)
    i = httpclient.InferInput(names.IMAGE, list(arr.shape), "BYTES")
    i.set_data_from_numpy(arr, binary_data=True)  # JPEG bytes are not UTF-8: JSON cannot carry them (nor in Triton)
    inputs = [i]
    if beam:
        b = httpclient.InferInput(names.BEAM_SIZE, [len(imgs), 1], "INT32")
        b.set_data_from_numpy(np.full((len(imgs), 1), beam, np.int32), binary_data=binary_in)
        inputs.append(b)
    res = c.infer(names.ENSEMBLE, inputs, outputs=[httpclient.InferRequestedOutput(names.CAPTION,
                                                                                    binary_data=binary_out)])
    return [x.decode() if isinstance(x, bytes) else x for x in res.as_numpy(names.CAPTION).reshape(-1)]


def test_health_metadata_and_config_match_grpc(server):
    h, g = httpclient.InferenceServerClient(server.http_host), grpcclient.InferenceServerClient(server.grpc)
    assert h.is_server_live() and h.is_server_ready()
    assert h.is_model_ready(names.ENSEMBLE) and not h.is_model_ready("nope")
    assert "binary_tensor_data" in h.get_server_metadata()["extensions"]
    md = h.get_model_metadata(names.ENSEMBLE)
    assert md["inputs"][0] == {"name": names.IMAGE, "datatype": "BYTES", "shape": [-1, 1]}
    for m in (names.ENSEMBLE, names.ENCODER, names.DECODER):
        want = json_format.MessageToDict(g.get_model_config(m).config, preserving_proto_field_name=True)
        assert h.get_model_config(m) == want


# binary_in: BEAM_SIZE as binary data or as JSON `data`; binary_out: CAPTION as binary data or JSON
@pytest.mark.parametrize("binary_in,binary_out", [(True, True), (False, False), (True, False), (False, True)])
def test_http_captions_equal_grpc(server, images, binary_in, binary_out):
    want = caption_bytes(server.grpc, images)
    assert _http_caption(server.http_host, images, binary_in, binary_out) == want
    assert _http_caption(server.http_host, images[:2], binary_in, binary_out, beam=3) == \
        caption_bytes(server.grpc, images[:2], beam=3)


def _post(url, body: bytes, headers: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _headers_only(hostport, path, length, headers) -> tuple[int, dict]:
    import http.client

    host, port = hostport.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    c.putrequest("POST", path)
    for k, v in {**headers, "Content-Length": str(length)}.items():
        c.putheader(k, v)
    c.endheaders()
    r = c.getresponse()
    return r.status, json.loads(r.read() or b"{}")


def _binary_request(img: bytes, size_delta=0, shape=(1, 1), parameters=None) -> tuple[bytes, dict]:
    blob = len(img).to_bytes(4, "little") + img
    head = json.dumps({"inputs": [{"name": names.IMAGE, "datatype": "BYTES", "shape": list(shape),
                                   "parameters": {"binary_data_size": len(blob) + size_delta}}],
                       **({"parameters": parameters} if parameters else {})}).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


@pytest.mark.parametrize("case,status,grpc_code,needle", [
    ("unknown-model", 404, "NOT_FOUND", "Request for unknown model: 'nope' is not found"),
    ("corrupt-image", 400, "INVALID_ARGUMENT", "not a recognised image format"),
    ("bad-shape", 400, "INVALID_ARGUMENT", "has shape [1, 2], expected [-1, 1]"),
    ("size-past-end", 400, None, "runs past"),
    ("unclaimed-bytes", 400, None, "binary bytes that no input's binary_data_size claims"),
    ("not-json", 400, None, "failed to parse the request JSON"),
    ("deep-json", 400, None, "failed to parse the request JSON"),
    ("too-large", 413, "RESOURCE_EXHAUSTED", "over the limit"),
    ("timeout", 503, None, "deadline exceeded: request dropped"),  # parameters.timeout (us): Triton's request timeout
])
def test_errors_map_to_the_same_statuses_as_grpc(server, images, case, status, grpc_code, needle):
    good = images[0]
    model, img, delta, shape = names.ENSEMBLE, good, 0, (1, 1)
    if case == "unknown-model":
        model = "nope"
    elif case == "corrupt-image":
        img = b"\x00\x01garbage"
    elif case == "bad-shape":
        shape = (1, 2)
    elif case == "size-past-end":
        delta = 10
    elif case == "unclaimed-bytes":
        delta = -3
    elif case == "too-large":
        img = b"\xff" * (18 << 20)  # over the 17 MiB receive limit of both protocols
    body, headers = _binary_request(img, delta, shape, {"timeout": 1} if case == "timeout" else None)
    if case == "not-json":
        body, headers = b"{nope" + body, {}
    elif case == "deep-json":
        body, headers = b'{"inputs": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", {}
    if case == "too-large":  # refused from the headers alone, before the client sends the body
        got, err = _headers_only(server.http_host, f"/v2/models/{model}/infer", len(body), headers)
    else:
        got, err = _post(f"{server.http}/v2/models/{model}/infer", body, headers)
    assert got == status and needle in err.get("error", ""), (got, err)
    if grpc_code and case != "bad-shape":  # the same request over gRPC gets the matching status
        g = grpcclient.InferInput(names.IMAGE, [1, 1], "BYTES")
        g.set_data_from_numpy(np.array([[img]], dtype=object))
        with pytest.raises(InferenceServerException) as ei:
            grpcclient.InferenceServerClient(server.grpc).infer(model, [g])
        assert grpc_code in str(ei.value.status())
    assert server.proc.poll() is None
    assert _http_caption(server.http_host, [good])  # still serving


def test_metrics_add_up_after_load(server, images):
    before, _ = scrape(server.metrics)
    n_ok, n_bad = 48, 5

    def one(k):
        if k < n_bad:
            body, headers = _binary_request(b"not an image")
            return _post(f"{server.http}/v2/models/{names.ENSEMBLE}/infer", body, headers)[0]
        if k % 2:
            return len(_http_caption(server.http_host, [images[k % 4]]))
        return len(caption_bytes(server.grpc, [images[k % 4]]))

    with ThreadPoolExecutor(16) as ex:
        res = list(ex.map(one, range(n_ok + n_bad)))
    assert res[:n_bad] == [400] * n_bad and res[n_bad:] == [1] * n_ok
    after, types = scrape(server.metrics)
    for f in FAMILIES:  # Triton's names, no _total suffix, typed counter
        assert types.get(f) == "counter", (f, types)
        assert any(n == f and ("version", "1") in lab for (n, lab) in after), f
    d = {f: total(after, f) - total(before, f) for f in FAMILIES}
    assert d["nv_inference_request_success"] == n_ok
    assert d["nv_inference_request_failure"] == n_bad
    assert d["nv_inference_request_success"] + d["nv_inference_request_failure"] == n_ok + n_bad
    assert d["nv_inference_count"] == n_ok  # one image per request
    assert 0 < d["nv_inference_exec_count"] < d["nv_inference_count"], d  # concurrent requests were batched
    assert d["nv_inference_request_duration_us"] > d["nv_inference_compute_infer_duration_us"] > 0, d
    assert d["nv_inference_queue_duration_us"] > 0, d
    rejected = [v - before.get(k, 0) for k, v in after.items()
                if k[0] == "nv_inference_request_failure" and ("reason", "REJECTED") in k[1]
                and ("model", names.ENSEMBLE) in k[1]]
    assert rejected == [n_bad]


def test_adapter_rule_queries_names_the_server_exposes(server):
    """k8s/prometheus-adapter/values.yaml's rule must name series that exist."""
    from pathlib import Path

    import yaml

    rule = yaml.safe_load((Path(__file__).resolve().parents[2] / "k8s/prometheus-adapter/values.yaml")
                          .read_text())["rules"]["custom"][0]
    _, types = scrape(server.metrics)
    used = set(re.findall(r"\b(nv_\w+)\{", rule["metricsQuery"] + rule["seriesQuery"]))
    assert used and used <= {k for k, t in types.items() if t == "counter"}, (used, types)


def test_listening_socket_passes_tcp_nodelay_to_connections():
    """A socket made with proto 0 makes asyncio skip TCP_NODELAY on accepted connections: every HTTP
    answer with a body then waited ~40 ms (Nagle + delayed ACK; measured 48 ms vs 6 ms)."""
    import socket

    from captioner.serving.server.http import bind

    s = bind("127.0.0.1", 0)
    try:
        c = socket.create_connection(s.getsockname())
        conn, _ = s.accept()
        assert conn.proto == socket.IPPROTO_TCP and conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        conn.close()
        c.close()
    finally:
        s.close()
