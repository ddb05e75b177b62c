"""`captioner web`: a small gateway (FastAPI) in front of Triton or `captioner serve`, reached
through Triton's gRPC inference API (grpc.aio on the event loop: no thread per request).

- GET /            one page: drop or choose images, pick greedy or beam, see each image with its caption
- POST /api/caption multipart field `files` (one or many images), form field `beam` -> JSON captions
- GET /docs        the API reference, rendered here from /openapi.json (no third-party scripts)
- GET /healthz     the gateway process is up; GET /readyz: ready only when the model server and model are
- GET /metrics     the gateway's own Prometheus metrics (requests, latency histogram, errors by status)

Limits (the memory bound is stated next to the pod's limit in k8s/base/web.yaml):
- A request body over `max_body` bytes is 413 (from Content-Length before anything is read; a
  body without one is 411); more than `max_images` files is 400. The body is parsed as it
  streams in (python-multipart's MultipartParser), straight into one buffer holding the images
  as the model server's BYTES tensor: nothing is spooled to disk, no form is left open.
- Admission by memory: a request reserves COPIES x its Content-Length from `memory_budget`
  before its body is read (the received tensor, the upstream gRPC message, gRPC's send buffer);
  when it does not fit, or MAX_IN_FLIGHT requests are in progress, 503 with Retry-After.
- The model server's per-request pixel budget (captioner.core.limits.REQUEST_PIXEL_BUDGET) applies to
  the whole gateway request: images are checked from their headers in upload order and those
  beyond the budget get their own error; the rest go upstream as few requests as the server's
  message limit allows, one after another, so one gateway request is at most one model-server
  request at a time and the server's light/heavy decoding lanes keep a small request apart
  from a user's heavy ones.
- /healthz, /readyz and /metrics run on the event loop and wait for no worker.
- An image the model server refuses is reported for that image alone. The model server down is
  502, not ready 503, too slow 504, each with the reason; its address is logged, never answered.
- Every answer carries nosniff, a Content-Security-Policy (the page's inline script and style by
  hash) and frame-ancestors 'none'.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import json
import logging
import re
import struct
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.requests import ClientDisconnect

from captioner.core.limits import (BODY_IDLE_TIMEOUT_S, BODY_TIMEOUT_S, CAPTION_TIMEOUT_S, COPIES, HEADER_TIMEOUT_S,
                                   MAX_BEAM, MAX_BODY, MAX_IMAGE_BYTES, MAX_IMAGES, MAX_IN_FLIGHT, MEMORY_BUDGET,
                                   REQUEST_PIXEL_BUDGET, UPSTREAM_MAX_BYTES, WEB_RETRY_AFTER_S)
from captioner.core.names import BEAM_SIZE, CAPTION, ENSEMBLE, IMAGE
from captioner.serving.client import TLS
from captioner.serving.errors import RequestError
from captioner.serving.server.codec import LENGTH, bytes_elements, bytes_parts, infer_request

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})  # metric label values
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"}


class Upstream(Exception):
    """The model server did not answer usefully: HTTP status and reason for the whole request."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def _classify(code, details: str) -> Upstream | None:
    """A gRPC status from the model server -> Upstream for the whole request, or None for an
    error about these images (the model server refused them: INVALID_ARGUMENT). The reason
    never names the server's address (logged instead)."""
    import grpc

    if code == grpc.StatusCode.INVALID_ARGUMENT or (code == grpc.StatusCode.RESOURCE_EXHAUSTED
                                                    and "larger than max" in details):
        return None
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # the server's concurrent-RPC cap: busy, try again
        return Upstream(503, "the model server is busy: retry shortly")
    if code == grpc.StatusCode.NOT_FOUND:
        return Upstream(503, "the model server has no ready model")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Upstream(504, f"the model server did not answer in {CAPTION_TIMEOUT_S:.0f}s")
    if code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details:
        return Upstream(503, "the model server is shutting down: retry shortly")
    return Upstream(502, "the model server is unreachable or failing")


class Model:
    """The model server over grpc.aio: ModelInfer with the request message written by the wire
    codec (captioner.serving.server.codec.infer_request: the images are copied once into the
    message, not three times as through tritonclient)."""

    def __init__(self, url: str, model: str, tls: TLS | None):
        self.url, self.model, self.tls = url, model, tls
        self._stubs = None

    def _open(self):
        if self._stubs is None:  # made on the event loop that uses it
            import grpc
            from tritonclient.grpc import service_pb2

            opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 16 << 20)]
            if self.tls is None:
                ch = grpc.aio.insecure_channel(self.url, options=opts)
            else:
                def pem(path):  # TLS holds PEM file paths (as tritonclient takes them)
                    return Path(path).read_bytes() if path else None

                t = self.tls
                ch = grpc.aio.secure_channel(self.url, grpc.ssl_channel_credentials(
                    pem(t.root_certificates), pem(t.private_key), pem(t.certificate_chain)), options=opts)
            svc = "/inference.GRPCInferenceService/"
            self._stubs = {
                "infer": ch.unary_unary(svc + "ModelInfer", request_serializer=None,
                                        response_deserializer=service_pb2.ModelInferResponse.FromString),
                "server_ready": ch.unary_unary(svc + "ServerReady",
                                               request_serializer=service_pb2.ServerReadyRequest.SerializeToString,
                                               response_deserializer=service_pb2.ServerReadyResponse.FromString),
                "model_ready": ch.unary_unary(svc + "ModelReady",
                                              request_serializer=service_pb2.ModelReadyRequest.SerializeToString,
                                              response_deserializer=service_pb2.ModelReadyResponse.FromString)}
        return self._stubs

    async def ready(self) -> str | None:
        """None when the server and model are ready, else why not."""
        import grpc
        from tritonclient.grpc import service_pb2

        s = self._open()
        try:
            if not (await s["server_ready"](service_pb2.ServerReadyRequest(), timeout=5)).ready:
                return "the model server is not ready"
            if not (await s["model_ready"](service_pb2.ModelReadyRequest(name=self.model), timeout=5)).ready:
                return f"model '{self.model}' is not ready"
        except grpc.aio.AioRpcError as e:
            log.warning("readiness of %s: %s %s", self.url, e.code(), e.details())
            return "the model server is unreachable"
        return None

    def message(self, images: list[memoryview], beam: int) -> bytes:
        inputs = [(IMAGE, "BYTES", [len(images), 1], bytes_parts(images))]
        if beam != 1:  # greedy is the model's default: BEAM_SIZE is sent only for beam search
            inputs.append((BEAM_SIZE, "INT32", [len(images), 1], [struct.pack("<i", beam) * len(images)]))
        return infer_request(self.model, inputs, [CAPTION])

    async def caption(self, images: list[memoryview], beam: int) -> list[str]:
        """Captions, or grpc.aio.AioRpcError as the model server answered."""
        msg = await asyncio.to_thread(self.message, images, beam)  # a copy of up to 16 MiB: off the loop
        res = await self._open()["infer"](msg, timeout=CAPTION_TIMEOUT_S)
        del msg
        try:
            captions = bytes_elements(res.raw_output_contents[0], None, CAPTION)
        except RequestError as e:  # a malformed answer: the model server is failing
            log.warning("model server %s answered a malformed %s: %s", self.url, CAPTION, e)
            raise Upstream(502, "the model server is unreachable or failing") from None
        return [c.decode("utf-8", "replace") for c in captions]


class BadUpload(Exception):
    def __init__(self, status: int, msg: str):
        super().__init__(msg)
        self.status = status


class Upload:
    """A multipart/form-data body parsed as it streams in. Each part of field `files` goes into
    one buffer allocated from Content-Length (the whole body can only be larger), with a 4-byte
    length before it: the BYTES layout, so the images are never copied again until they are
    sent. Other fields (beam) are capped at 64 bytes, at most 8 of them."""

    def __init__(self, content_type: str, length: int, max_files: int):
        from python_multipart.multipart import MultipartParser, parse_options_header

        ctype, opts = parse_options_header(content_type)
        if ctype != b"multipart/form-data" or not opts.get(b"boundary"):
            raise BadUpload(400, "no images: send one or more files as multipart/form-data in the field 'files'")
        self.buf, self.n = bytearray(length), 0
        self.files: list[tuple[str, int, int]] = []  # (filename, start, end) in buf
        self.fields: dict[str, bytes] = {}
        self.max_files, self._hdr, self._field, self._value = max_files, {}, None, b""
        self._k, self._v, self._start, self._extra = b"", b"", 0, 0
        self._parse_options = parse_options_header
        self.parser = MultipartParser(opts[b"boundary"], {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": self._hfield, "on_header_value": self._hvalue, "on_header_end": self._hend,
            "on_headers_finished": self._headers_done})

    def _begin(self):
        self._hdr, self._field, self._value = {}, None, b""

    def _hfield(self, data, start, end):
        self._k += data[start:end]

    def _hvalue(self, data, start, end):
        self._v += data[start:end]

    def _hend(self):
        self._hdr[self._k.lower()] = self._v
        self._k, self._v = b"", b""

    def _headers_done(self):
        _, opts = self._parse_options(self._hdr.get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        if name == "files" and b"filename" in opts:
            if len(self.files) == self.max_files:
                raise BadUpload(400, f"too many images: at most {self.max_files} per request")
            self._field = ("file", opts[b"filename"].decode("utf-8", "replace")[:200])
            self.n += 4  # the length prefix, written at the part's end
            self._start = self.n
        else:
            if len(self.fields) >= 8:
                raise BadUpload(400, "too many form fields")
            self._field = ("field", name[:64])

    def _data(self, data, start, end):
        kind = self._field[0] if self._field else None
        if kind == "file":
            self.buf[self.n:self.n + end - start] = data[start:end]
            self.n += end - start
        elif kind == "field":
            self._value += data[start:end]
            if len(self._value) > 64:
                raise BadUpload(400, f"form field '{self._field[1]}' is over 64 bytes")

    def _end(self):
        if self._field and self._field[0] == "file":
            LENGTH.pack_into(self.buf, self._start - 4, self.n - self._start)
            self.files.append((self._field[1], self._start, self.n))
        elif self._field:
            self.fields[self._field[1]] = self._value
        self._field = None

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except BadUpload:
            raise
        except Exception as e:  # noqa: BLE001 - python-multipart's parse errors
            raise BadUpload(400, f"could not read the upload: {e}") from None

    def close(self) -> None:
        """Drop the parser: its callbacks are this object's methods, a reference cycle that
        would keep the buffer (up to max_body bytes) until the cyclic garbage collector ran
        (measured: +96 MiB of RSS per round of 8 large uploads, returned only now and then)."""
        self.parser = None

    def images(self) -> list[tuple[str, memoryview]]:
        mv = memoryview(self.buf)
        return [(name or f"image {i + 1}", mv[a:b]) for i, (name, a, b) in enumerate(self.files)]


class Admission:
    """Requests in progress, bounded by count and by the memory they may hold (bytes reserved
    from Content-Length before the body is read). One event loop: no lock needed."""

    def __init__(self, budget: int, max_requests: int):
        self.budget, self.max_requests = budget, max_requests
        self.reserved, self.requests, self.peak_reserved = 0, 0, 0

    def take(self, cost: int) -> bool:
        if self.requests >= self.max_requests or self.reserved + cost > self.budget:
            return False
        self.requests += 1
        self.reserved += cost
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return True

    def give(self, cost: int) -> None:
        self.requests -= 1
        self.reserved -= cost


def _hashes(page: str, tag: str) -> str:
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'"
                    for m in re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S))


def _docs_page(spec: dict) -> str:
    """The OpenAPI description as plain HTML: FastAPI's /docs loads Swagger UI from a CDN (a
    third party sees every visit, and the page is blank offline)."""
    rows = []
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            body = json.dumps(op.get("requestBody", {}), indent=1) if op.get("requestBody") else ""
            resp = ", ".join(f"{k}: {v.get('description', '')}" for k, v in op.get("responses", {}).items())
            rows.append(f"<h2>{html.escape(method.upper())} {html.escape(path)}</h2>"
                        f"<p>{html.escape(op.get('description') or op.get('summary') or '')}</p>"
                        + (f"<pre>{html.escape(body)}</pre>" if body else "")
                        + f"<p>Answers: {html.escape(resp)}</p>")
    info = spec.get("info", {})
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(info.get('title', ''))}"
            f" API</title></head><body><h1>{html.escape(info.get('title', ''))} API</h1>"
            f"<p>{html.escape(info.get('description', ''))} Machine-readable: <a href=/openapi.json>/openapi.json</a>"
            f"</p>{''.join(rows)}</body></html>")


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("captioner_web_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("captioner_web_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.errors = Counter("captioner_web_errors", "HTTP error answers (status >= 400) by status",
                              ["status"], registry=self.registry)
        self.images = Counter("captioner_web_images", "images received, by outcome (captioned / rejected)",
                              ["outcome"], registry=self.registry)


def create_app(url: str, model: str = ENSEMBLE, max_images: int = MAX_IMAGES, max_body: int = MAX_BODY,
               tls: TLS | None = None, memory_budget: int = MEMORY_BUDGET) -> FastAPI:
    app = FastAPI(title="captioner web", version="1", docs_url=None, redoc_url=None,
                  description=f"Captions images through the model server (model '{model}').")
    metrics = Metrics()
    upstream = Model(url, model, tls)
    admission = Admission(memory_budget, MAX_IN_FLIGHT)
    app.state.admission = admission
    page = (STATIC / "index.html").read_text().replace("{{MAX_IMAGES}}", str(max_images)) \
        .replace("{{MAX_BEAM}}", str(MAX_BEAM))
    page_csp = (f"default-src 'none'; script-src {_hashes(page, 'script')}; style-src {_hashes(page, 'style')}; "
                f"img-src blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

    @app.middleware("http")
    async def measure(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        method = request.method if request.method in METHODS else "other"  # bounded label values
        metrics.latency.labels(path).observe(time.perf_counter() - t0)
        metrics.requests.labels(path, method, str(response.status_code)).inc()
        if response.status_code >= 400:
            metrics.errors.labels(str(response.status_code)).inc()
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": page_csp})

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs():
        return HTMLResponse(_docs_page(app.openapi()))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        why = await upstream.ready()
        if why:
            return JSONResponse({"ready": False, "reason": why}, 503)
        return {"ready": True}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/api/caption", openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": f"one to {max_images} images (JPEG, PNG...)"},
            "beam": {"type": "integer", "default": 1, "minimum": 1, "maximum": MAX_BEAM,
                     "description": "1 = greedy decoding, more = beam search with that many beams"}}}}}}},
        responses={400: {"description": "no image, too many images, bad beam"},
                   408: {"description": "the body was not sent in time"},
                   411: {"description": "no Content-Length"}, 413: {"description": "request too large"},
                   502: {"description": "model server unreachable"},
                   503: {"description": "gateway or model server busy (Retry-After), model not ready"},
                   504: {"description": "model server too slow"}})
    async def api_caption(request: Request):
        """Caption each uploaded image. Answers `{"results": [{"filename", "caption"} or
        {"filename", "error"}], "beam"}` in upload order; an image the model server refuses, or
        beyond the request's pixel budget, gets its own `error` and the others are still captioned."""
        length = request.headers.get("content-length")
        if length is None:
            return JSONResponse({"detail": "send a Content-Length (chunked uploads are not accepted)"}, 411)
        if not (length.isascii() and length.isdigit()) or int(length) > max_body:
            return JSONResponse({"detail": f"request of {length[:20]} bytes is over the limit of {max_body} bytes"},
                                413, headers={"Connection": "close"})
        cost = COPIES * int(length)
        if not admission.take(cost):
            # the connection stays open: uvicorn reads and drops the unread body, so the client
            # (still sending) gets this answer rather than a reset
            return JSONResponse({"detail": "the gateway is busy: retry shortly"}, 503,
                                headers={"Retry-After": str(WEB_RETRY_AFTER_S)})
        try:
            return await _caption(request, int(length))
        except BadUpload as e:  # a stalled upload's connection is closed; others drain as above
            close = {"Connection": "close"} if e.status == 408 else None
            return JSONResponse({"detail": str(e)}, e.status, headers=close)
        except Upstream as e:
            return JSONResponse({"detail": str(e)}, e.status,
                                headers={"Retry-After": str(WEB_RETRY_AFTER_S)} if e.status == 503 else None)
        finally:
            admission.give(cost)

    async def _read(request: Request, length: int) -> Upload:
        up = Upload(request.headers.get("content-type", ""), length, max_images)
        chunks = request.stream().__aiter__()
        end = time.monotonic() + BODY_TIMEOUT_S
        try:
            while True:
                try:
                    async with asyncio.timeout(min(BODY_IDLE_TIMEOUT_S, max(0.0, end - time.monotonic()))):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return up
                except ClientDisconnect:  # nobody to answer: the status is for the access log only
                    raise BadUpload(400, "the client disconnected during the upload") from None
                except TimeoutError:
                    raise BadUpload(408, "the upload was not received in time") from None
                up.feed(chunk)
        finally:
            up.close()

    async def _caption(request: Request, length: int):
        up = await _read(request, length)
        images = up.images()
        if not images:
            return JSONResponse({"detail": "no images: send one or more files in the multipart field 'files'"}, 400)
        raw_beam = up.fields.get("beam", b"1").decode("utf-8", "replace").strip() or "1"
        if not (raw_beam.isascii() and raw_beam.isdigit()) or not 1 <= int(raw_beam) <= MAX_BEAM:
            return JSONResponse({"detail": f"beam must be between 1 and {MAX_BEAM}, got {raw_beam[:20]!r}"}, 400)
        beam = int(raw_beam)
        # a client that leaves cancels its upstream calls (the model server then drops the work)
        watcher = asyncio.create_task(_disconnected(request.receive))
        work = asyncio.create_task(_caption_images(images, beam))
        await asyncio.wait({watcher, work}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            log.info("client left: its request's model-server work was cancelled")
            return JSONResponse({"detail": "the client disconnected"}, 400)
        watcher.cancel()
        results = work.result()
        for r in results:
            metrics.images.labels("captioned" if "caption" in r else "rejected").inc()
        return {"beam": beam, "results": results}

    async def _caption_images(images, beam: int) -> list[dict]:
        # header checks copy each image once (PIL reads from bytes): off the event loop, which
        # keeps answering /healthz and other users meanwhile
        results, todo = await asyncio.to_thread(_check_images, images)
        for group in _groups(todo, [len(images[i][1]) for i in range(len(images))]):
            await _caption_group(group, images, beam, results)
        return results

    async def _caption_group(group: list[int], images, beam: int, results: list) -> None:
        """One upstream request for `group`; when the server refuses an image, that image gets
        the error and the others are sent one by one (so refusals cost at most twice the work)."""
        import grpc

        try:
            caps = await upstream.caption([images[i][1] for i in group], beam)
        except grpc.aio.AioRpcError as e:
            up = _classify(e.code(), e.details() or "")
            if up is not None:
                log.warning("model server %s: %s %s", url, e.code(), e.details())
                raise up from None
            if len(group) > 1:
                for i in group:
                    await _caption_group([i], images, beam, results)
                return
            name = images[group[0]][0]
            msg = re.sub(r"^\[\w+\] ", "", e.details() or "").replace("IMAGE[0]", name)
            results[group[0]] = {"filename": name, "error": f"{name}: rejected by the model: {msg}"}
            return
        for i, c in zip(group, caps):
            results[i] = {"filename": images[i][0], "caption": c}

    return app


async def _disconnected(receive) -> None:
    """Returns when the client has gone (after the body, the next ASGI message is http.disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _check_images(images: list[tuple[str, memoryview]]) -> tuple[list, list[int]]:
    """Per image from its header, in upload order: (results with an error for each image refused
    here, indices of those to caption). Refused: empty, over MAX_IMAGE_BYTES, not an accepted
    format, over the per-image pixel cap or aspect ratio, beyond the request's pixel budget."""
    from captioner.core.preprocess import SERVING_MAX_PIXELS, ImageError, open_image

    results: list[dict | None] = [None] * len(images)
    todo, pixels = [], 0
    for i, (name, data) in enumerate(images):
        if not len(data):
            results[i] = {"filename": name, "error": f"{name}: empty file"}
            continue
        if len(data) > MAX_IMAGE_BYTES:
            results[i] = {"filename": name, "error": f"{name}: {len(data)} bytes, over the limit of "
                                                     f"{MAX_IMAGE_BYTES} bytes per image"}
            continue
        try:
            with open_image(bytes(data), SERVING_MAX_PIXELS, name=name) as img:
                w, h = img.size
        except ImageError as e:
            results[i] = {"filename": name, "error": str(e)}
            continue
        if pixels + w * h > REQUEST_PIXEL_BUDGET:
            results[i] = {"filename": name, "error": f"{name}: over this request's pixel budget of "
                                                     f"{REQUEST_PIXEL_BUDGET / 1e6:.0f} megapixels (the images "
                                                     f"before it used {pixels / 1e6:.1f}): send it in another request"}
            continue
        pixels += w * h
        todo.append(i)
    return results, todo


def _groups(order: list[int], sizes: list[int]) -> list[list[int]]:
    """Consecutive images packed into upstream messages of at most UPSTREAM_MAX_BYTES."""
    out, cur, total = [], [], 0
    for i in order:
        if cur and total + sizes[i] + 4 > UPSTREAM_MAX_BYTES:
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += sizes[i] + 4
    return out + ([cur] if cur else [])


def run(url: str, host: str = "127.0.0.1", port: int = 8080, model: str = ENSEMBLE, max_images: int = MAX_IMAGES,
        max_body: int = MAX_BODY, tls: TLS | None = None) -> None:
    import uvicorn

    from captioner.serving.server.http import _protocol, bind, return_large_buffers_to_the_os

    return_large_buffers_to_the_os()  # request buffers go back to the OS when freed (see there)

    try:
        sock = bind(host, port)
    except OSError as e:
        raise SystemExit(f"captioner web: {str(e).replace('--http-port', '--port')}") from None
    log.info("captioner web on http://%s:%d/ -> model server %s (model %s)", host, sock.getsockname()[1], url,
             model)
    # no limit_concurrency (it counts idle connections): the app admits work by memory; request
    # heads must arrive within HEADER_TIMEOUT_S (captioner.serving.server.http._protocol)
    uvicorn.Server(uvicorn.Config(create_app(url, model, max_images, max_body, tls), log_level="info",
                                  http=_protocol(HEADER_TIMEOUT_S), timeout_keep_alive=30)).run(sockets=[sock])
