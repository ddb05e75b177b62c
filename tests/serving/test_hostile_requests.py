"""Hostile requests against `captioner serve`: heavy images, malformed BYTES tensors and oversized
messages, clients that give up, shutdown, and a second server started on a busy port.

Each test performs one attack and checks the bounded outcome: refused with a clear error, other
clients unaffected, memory bounded, abandoned work skipped. Probe images are generated here.
No test asserts on a duration: ordering, counters in the server log and status codes only.
"""
import io
import re
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc

from captioner.core import names
from captioner.data.samples import sample_images
from captioner.modeling.checkpoint import load_checkpoint
from captioner.serving.client import caption_bytes
from tests.helpers import free_port, start_serve

# An image just under the serving cap of 16 megapixels; two of them fill a request's pixel budget.
HEAVY_SIDE = 3900


@pytest.fixture(scope="module")
def heavy_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (HEAVY_SIDE, HEAVY_SIDE), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def good(trained_run) -> bytes:
    return sample_images(load_checkpoint(trained_run.out_dir).config.data, 1)[0][1]


def _serve(repo, tmp_path_factory, name):
    log = tmp_path_factory.mktemp(name) / "serve.log"
    p, url = start_serve(repo, log)
    return p, url, log


def bytes_tensor(items: list[bytes]) -> bytes:
    """The KServe v2 / Triton raw BYTES layout: each element a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def infer_raw(url, model, tensors, timeout=60.0, max_send=None):
    """One ModelInfer RPC built by hand, so malformed payloads reach the server as sent.
    tensors: [(name, datatype, shape, raw bytes)]."""
    opts = [("grpc.max_send_message_length", max_send)] if max_send else []
    with grpc.insecure_channel(url, options=opts) as ch:
        req = service_pb2.ModelInferRequest(model_name=model)
        for name, dt, shape, raw in tensors:
            req.inputs.add(name=name, datatype=dt, shape=shape)
            req.raw_input_contents.append(raw)
        return service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=timeout)


def image_request(images: list[bytes]):
    return [(names.IMAGE, "BYTES", [len(images), 1], bytes_tensor(images))]


def assert_no_traceback(log):
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


# -- heavy images -----------------------------------------------------------------------------------

def test_heavy_requests_do_not_stall_a_small_one(server, heavy_png, good):
    """Four clients send two 15-megapixel images each; a fifth sends one small image after them.
    The small request must not wait behind their decoding (today it waits in the batcher thread
    behind all of them): it completes before at least three of the four heavy requests."""
    url = server.grpc
    done: list[str] = []
    lock = threading.Lock()

    def call(tag, images):
        infer_raw(url, names.ENSEMBLE, image_request(images))
        with lock:
            done.append(tag)

    with ThreadPoolExecutor(5) as ex:
        heavy = [ex.submit(call, f"heavy{i}", [heavy_png, heavy_png]) for i in range(4)]
        time.sleep(0.3)  # ordering, not a bound: the heavy requests are sent first
        small = ex.submit(call, "small", [good])
        for f in heavy + [small]:
            f.result(timeout=300)
    assert len(done) == 5
    assert done.index("small") <= 1, f"completion order {done}: the small request waited behind heavy decoding"


def test_request_pixel_budget_refuses_many_heavy_images(server, heavy_png, good):
    """Three 15-megapixel images (45 MP) exceed the per-request budget: refused before decoding."""
    url, p = server.grpc, server.proc
    with pytest.raises(grpc.RpcError) as ei:
        infer_raw(url, names.ENSEMBLE, image_request([heavy_png] * 3))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
    assert "pixel budget" in ei.value.details() and "45.6" in ei.value.details(), ei.value.details()
    assert caption_bytes(url, [good])[0] and p.poll() is None


def _hwm_mib(pid) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


@pytest.mark.parametrize("model", [names.PREPROCESS, names.ENSEMBLE])
def test_memory_bounded_under_three_concurrent_heavy_requests(exported_repo, tmp_path_factory, heavy_png, good,
                                                              model):
    """Three concurrent requests of two 15-megapixel RGBA images each. Decoding one such image takes
    about 60 MiB (RGBA) + 45 MiB (RGB) + the resize. Decoded one image at a time in the heavy lane the
    server's peak grew by 118 MiB (both models); decoded in every request thread at once (the old
    preprocess path) it grew by 305 MiB. Bound: 200 MiB."""
    buf = io.BytesIO()
    Image.new("RGBA", (HEAVY_SIDE, HEAVY_SIDE), (10, 200, 30, 128)).save(buf, "PNG")
    rgba = buf.getvalue()
    p, url, log = _serve(exported_repo[0], tmp_path_factory, "memory")
    try:
        caption_bytes(url, [good])  # warm: sessions, thread pools and allocator arenas exist
        infer_raw(url, names.PREPROCESS, image_request([good]))
        before = _hwm_mib(p.pid)
        with ThreadPoolExecutor(3) as ex:
            for r in ex.map(lambda _: infer_raw(url, model, image_request([rgba, rgba])), range(3)):
                assert r.outputs
        grew = _hwm_mib(p.pid) - before
        print(f"{model}: peak RSS {before:.0f} MiB -> {before + grew:.0f} MiB (+{grew:.0f})")
        assert grew < 200, f"peak RSS grew by {grew:.0f} MiB under three concurrent heavy requests"
        assert_no_traceback(log)
    finally:
        p.kill()
        p.wait()


# -- BYTES tensors and message limits ----------------------------------------------------------------

def test_malformed_length_prefix_is_invalid_argument(server, good):
    url, p, log = server.grpc, server.proc, server.log
    raw = struct.pack("<I", 1000) + b"only ten b"  # declares 1000 bytes, holds 10
    with pytest.raises(grpc.RpcError) as ei:
        infer_raw(url, names.ENSEMBLE, [(names.IMAGE, "BYTES", [1, 1], raw)])
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
    assert "IMAGE" in ei.value.details() and "1000 bytes" in ei.value.details(), ei.value.details()
    with pytest.raises(grpc.RpcError) as ei:
        infer_raw(url, names.ENSEMBLE, [(names.IMAGE, "BYTES", [1, 1], b"\x05\x00")])  # half a prefix
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
    assert "length prefix" in ei.value.details(), ei.value.details()
    assert caption_bytes(url, [good])[0] and p.poll() is None
    assert_no_traceback(log)


def test_bytes_element_count_is_checked_while_walking(server, good):
    """Two million empty elements for a [1, 1] tensor: the server stops at the second element
    (its answer says 'more than 1'), instead of deserialising all of them first."""
    url, p = server.grpc, server.proc
    with pytest.raises(grpc.RpcError) as ei:
        infer_raw(url, names.ENSEMBLE, [(names.IMAGE, "BYTES", [1, 1], b"\x00\x00\x00\x00" * 2_000_000)])
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
    assert "more than 1 element" in ei.value.details(), ei.value.details()
    assert caption_bytes(url, [good])[0] and p.poll() is None


def test_oversized_message_is_refused_by_grpc(server, good):
    """A 40 MiB request is over the receive limit sized for the largest accepted image (17 MiB):
    gRPC refuses it before the server reads it."""
    url, p = server.grpc, server.proc
    payload = bytes_tensor([b"\x00" * (40 << 20)])
    with pytest.raises(grpc.RpcError) as ei:
        infer_raw(url, names.ENSEMBLE, [(names.IMAGE, "BYTES", [1, 1], payload)], max_send=64 << 20)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value
    assert caption_bytes(url, [good])[0] and p.poll() is None


def test_concurrent_rpcs_are_limited(exported_repo, heavy_png):
    """With maximum_concurrent_rpcs=2, the third and later concurrent calls are refused at once
    with RESOURCE_EXHAUSTED instead of queueing without bound."""
    from captioner.serving.server.app import start_server

    s = start_server(exported_repo[0], port=free_port(), max_concurrent_rpcs=2)
    try:
        url = f"127.0.0.1:{s.port}"

        def call(_):
            try:
                infer_raw(url, names.ENSEMBLE, image_request([heavy_png, heavy_png]))
                return "ok"
            except grpc.RpcError as e:
                return e.code().name

        with ThreadPoolExecutor(6) as ex:
            codes = list(ex.map(call, range(6)))
        assert "RESOURCE_EXHAUSTED" in codes and "ok" in codes, codes
    finally:
        s.stop(grace=0)


# -- deadlines and cancellation --------------------------------------------------------------------

@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_abandoned_requests_are_not_decoded(server, heavy_png, good, how):
    """Four clients give up on two heavy images each, by a 0.2 s deadline (DEADLINE_EXCEEDED) or by
    cancelling the call. The server must drop their work instead of decoding it for nobody: its log
    counts the skipped images, and at least the three requests queued behind the first in the heavy
    lane are skipped whole (6 images). The next request is served."""
    url, p, log = server.grpc, server.proc, server.log
    before = len(re.findall(r"skipped decoding (\d+) of 2 image", log.read_text()))
    with grpc.insecure_channel(url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        req = service_pb2.ModelInferRequest(model_name=names.ENSEMBLE)
        for name, dt, shape, raw in image_request([heavy_png, heavy_png]):
            req.inputs.add(name=name, datatype=dt, shape=shape)
            req.raw_input_contents.append(raw)
        calls = [stub.ModelInfer.future(req, timeout=0.2 if how == "deadline" else 120) for _ in range(4)]
        if how == "cancel":
            time.sleep(0.2)
            for c in calls:
                c.cancel()
        codes = []
        for c in calls:
            try:
                c.result()
                codes.append("ok")
            except grpc.RpcError as e:
                codes.append(e.code().name)
            except grpc.FutureCancelledError:
                codes.append("CANCELLED")
    assert codes == ["DEADLINE_EXCEEDED" if how == "deadline" else "CANCELLED"] * 4, codes
    assert caption_bytes(url, [good])[0] and p.poll() is None  # the next request is served
    end = time.monotonic() + 60
    while time.monotonic() < end:  # the server logs its skips as it reaches the abandoned requests
        lines = re.findall(r"skipped decoding (\d+) of 2 image", log.read_text())[before:]
        if sum(int(n) for n in lines) >= 6:
            break
        time.sleep(0.2)
    assert sum(int(n) for n in lines) >= 6, log.read_text()[-3000:]


def test_batcher_drops_expired_items_before_running(good):
    """An item whose deadline passed while queued never reaches the model function (the encoder)."""
    from captioner.serving.server.batching import Batcher
    from captioner.serving.server.errors import Deadline, Expired

    seen = []
    b = Batcher(lambda items: [seen.append(x) or x for x in items], max_batch=4, delay_s=0.01, name="t")
    try:
        expired = Deadline(time.monotonic() - 1)
        f_old = b.submit("old", 1, expired)
        f_new = b.submit("new", 1, Deadline(time.monotonic() + 60))
        assert f_new.result(timeout=10) == "new"
        with pytest.raises(Expired):
            f_old.result(timeout=10)
        assert seen == ["new"]
    finally:
        b.stop()


# -- shutdown --------------------------------------------------------------------------------------

def test_batcher_stop_settles_every_pending_future():
    """Items queued when stop() is called are answered or failed, never left pending: here one item
    that does not fit the running batch (it used to be pushed back behind the stop signal), and one
    submitted after stop."""
    from captioner.serving.server.batching import Batcher

    release = threading.Event()

    def fn(items):
        release.wait(10)
        return [f"done:{x}" for x in items]

    b = Batcher(fn, max_batch=2, delay_s=0.05, name="t")
    blocker = b.submit("x", 2)  # occupies the model function until released
    time.sleep(0.2)
    small, big = b.submit("a", 1), b.submit("b", 2)  # 1 + 2 rows > max_batch: b waits for the next batch
    stopper = threading.Thread(target=b.stop)
    stopper.start()
    time.sleep(0.2)
    release.set()
    stopper.join(30)
    assert not stopper.is_alive()
    for f in (blocker, small, big):
        assert f.done(), "a future was left pending after stop()"
        assert f.exception() is not None or f.result().startswith("done:")
    late = b.submit("c", 1)
    assert late.done() and "shutting down" in str(late.exception())


# -- a second server on a busy port -----------------------------------------------------------------

def test_second_server_on_busy_port_exits_nonzero(server, exported_repo, good):
    url, p = server.grpc, server.proc
    port = url.rsplit(":", 1)[1]
    r = subprocess.run([sys.executable, "-m", "captioner", "serve", str(exported_repo[0]), "--grpc-port", port],
                       capture_output=True, text=True, timeout=90, env=dict(__import__("os").environ))
    print(r.stderr)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "address already in use" in r.stderr and port in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert caption_bytes(url, [good])[0] and p.poll() is None  # the first server still answers
