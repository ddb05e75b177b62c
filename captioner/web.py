"""`captioner web`: a small gateway (FastAPI) in front of Triton or `captioner serve`, reached
through tritonclient gRPC (captioner.client, as `captioner caption --url`).

- GET /            one page: drop or choose images, pick greedy or beam, see each image with its caption
- POST /api/caption multipart field `files` (one or many images), form field `beam` -> JSON captions
- GET /docs        OpenAPI
- GET /healthz     the gateway process is up; GET /readyz: ready only when the model server and model are
- GET /metrics     the gateway's own Prometheus metrics (requests, latency histogram, errors by status)

Limits: a request body over `max_body` bytes is 413 (checked from Content-Length before anything
is read; a body without a Content-Length is 411), more than `max_images` files is 400, an image
the model server refuses (not an image, too large...) is reported for that image alone.
The model server down is 502, not ready 503, too slow 504, each with the reason.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from captioner.client import TLS, _client, caption_bytes
from captioner.names import ENSEMBLE
from captioner.serve import MAX_IMAGE_BYTES
from captioner.serving_core import MAX_BEAM

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("web_static")
MAX_IMAGES = 16
MAX_BODY = 32 << 20  # a request of 16 phone JPEGs (~2 MB each)
CAPTION_TIMEOUT_S = 60.0


class Upstream(Exception):
    """The model server did not answer usefully: HTTP status and reason for the whole request."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def _classify(e: Exception, url: str) -> Upstream | None:
    """A tritonclient error -> Upstream for the whole request, or None for an error about this
    image only (the model server refused it: INVALID_ARGUMENT)."""
    status = str(getattr(e, "status", lambda: "")() or "")
    msg = e.message() if hasattr(e, "message") else str(e)
    if "INVALID_ARGUMENT" in status or ("RESOURCE_EXHAUSTED" in status and "larger than max" in msg):
        return None  # this image: refused by the model, or over the server's message size
    if "RESOURCE_EXHAUSTED" in status:  # the server's concurrent-RPC cap: busy, try again
        return Upstream(503, f"model server at {url} is busy: {msg}")
    if "NOT_FOUND" in status:
        return Upstream(503, f"model server at {url} has no ready model: {msg}")
    if "DEADLINE_EXCEEDED" in status:
        return Upstream(504, f"model server at {url} did not answer in {CAPTION_TIMEOUT_S:.0f}s")
    if "UNAVAILABLE" in status and "shutting down" in msg:
        return Upstream(503, f"model server at {url} is shutting down: {msg}")
    return Upstream(502, f"model server at {url} unreachable or failing: {msg}")


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
               tls: TLS | None = None) -> FastAPI:
    app = FastAPI(title="captioner web", version="1",
                  description=f"Captions images through the model server at {url} (model '{model}').")
    metrics = Metrics()
    pool = ThreadPoolExecutor(max_images, thread_name_prefix="caption")
    page = (STATIC / "index.html").read_text()

    @app.middleware("http")
    async def measure(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.latency.labels(path).observe(time.perf_counter() - t0)
        metrics.requests.labels(path, request.method, str(response.status_code)).inc()
        if response.status_code >= 400:
            metrics.errors.labels(str(response.status_code)).inc()
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return page.replace("{{MAX_IMAGES}}", str(max_images)).replace("{{MAX_BEAM}}", str(MAX_BEAM))

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        try:
            c = _client(url, tls)
            if not c.is_server_ready(client_timeout=5):
                return JSONResponse({"ready": False, "reason": f"model server at {url} is not ready"}, 503)
            if not c.is_model_ready(model, client_timeout=5):
                return JSONResponse({"ready": False, "reason": f"model '{model}' is not ready at {url}"}, 503)
        except Exception as e:  # noqa: BLE001 - any failure to ask means not ready
            msg = e.message() if hasattr(e, "message") else str(e)
            return JSONResponse({"ready": False, "reason": f"model server at {url} unreachable: {msg}"}, 503)
        return {"ready": True}

    @app.get("/metrics", include_in_schema=False)
    def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def caption_one(data: bytes, beam: int) -> str:
        return caption_bytes(url, [data], beam=beam, model=model, timeout=CAPTION_TIMEOUT_S, tls=tls)[0]

    @app.post("/api/caption", openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": f"one to {max_images} images (JPEG, PNG...)"},
            "beam": {"type": "integer", "default": 1, "minimum": 1, "maximum": MAX_BEAM,
                     "description": "1 = greedy decoding, more = beam search with that many beams"}}}}}}},
        responses={400: {"description": "no image, too many images, bad beam"},
                   411: {"description": "no Content-Length"}, 413: {"description": "request too large"},
                   502: {"description": "model server unreachable"}, 503: {"description": "model not ready"},
                   504: {"description": "model server too slow"}})
    async def api_caption(request: Request):
        """Caption each uploaded image. Answers `{"results": [{"filename", "caption"} or
        {"filename", "error"}], "beam"}` in upload order; an image the model server refuses
        gets its own `error` and the others are still captioned."""
        length = request.headers.get("content-length")
        if length is None:
            return JSONResponse({"detail": "send a Content-Length (chunked uploads are not accepted)"}, 411)
        if not length.isdigit() or int(length) > max_body:
            return JSONResponse({"detail": f"request of {length} bytes is over the limit of {max_body} bytes"}, 413)
        try:
            form = await request.form(max_files=max_images, max_fields=8, max_part_size=1 << 16)
        except Exception as e:  # noqa: BLE001 - starlette's HTTPException (too many files) or a broken body
            detail = getattr(e, "detail", None) or str(e)
            if "Too many files" in str(detail):
                detail = f"too many images: at most {max_images} per request"
            return JSONResponse({"detail": f"could not read the upload: {detail}"}, 400)
        files = [f for f in form.getlist("files") if hasattr(f, "read")]
        if not files:
            return JSONResponse({"detail": "no images: send one or more files in the multipart field 'files'"}, 400)
        try:
            beam = int(form.get("beam") or 1)
        except ValueError:
            return JSONResponse({"detail": f"beam must be an integer, got {form.get('beam')!r}"}, 400)
        if not 1 <= beam <= MAX_BEAM:
            return JSONResponse({"detail": f"beam must be between 1 and {MAX_BEAM}, got {beam}"}, 400)
        blobs = [await f.read() for f in files]
        names = [f.filename or f"image {i + 1}" for i, f in enumerate(files)]
        results = [None] * len(blobs)
        jobs = {}
        for i, (n, b) in enumerate(zip(names, blobs)):
            if not b:
                results[i] = {"filename": n, "error": f"{n}: empty file"}
            elif len(b) > MAX_IMAGE_BYTES:
                results[i] = {"filename": n, "error": f"{n}: {len(b)} bytes, over the limit of {MAX_IMAGE_BYTES} "
                                                      f"bytes per image"}
            else:
                jobs[i] = pool.submit(caption_one, b, beam)
        for i, f in jobs.items():
            try:
                results[i] = {"filename": names[i], "caption": await run_in_threadpool(f.result)}
            except Exception as e:  # noqa: BLE001 - classified below
                up = _classify(e, url)
                if up is not None:
                    log.warning("%s", up)
                    return JSONResponse({"detail": str(up)}, up.status)
                msg = e.message() if hasattr(e, "message") else str(e)
                results[i] = {"filename": names[i], "error": f"{names[i]}: rejected by the model: {msg}"}
        for r in results:
            metrics.images.labels("captioned" if "caption" in r else "rejected").inc()
        return {"beam": beam, "results": results}

    return app


def run(url: str, host: str = "127.0.0.1", port: int = 8080, model: str = ENSEMBLE, max_images: int = MAX_IMAGES,
        max_body: int = MAX_BODY, tls: TLS | None = None) -> None:
    import uvicorn

    from captioner.http_server import bind

    try:
        sock = bind(host, port)
    except OSError as e:
        raise SystemExit(f"captioner web: {str(e).replace('--http-port', '--port')}") from None
    log.info("captioner web on http://%s:%d/ -> model server %s (model %s)", host, sock.getsockname()[1], url,
             model)
    uvicorn.Server(uvicorn.Config(create_app(url, model, max_images, max_body, tls), log_level="info",
                                  timeout_keep_alive=30)).run(sockets=[sock])
