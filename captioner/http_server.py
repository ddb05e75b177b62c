"""Triton's HTTP/REST API (KServe v2 + Triton's binary tensor data extension) for `captioner
serve --http-port`, on FastAPI/uvicorn. Routes only decode/encode the wire format and hand off
to the same DataPlane as the gRPC Servicer, so both protocols share one request path, one set
of checks and one set of metrics.

Followed (triton-inference-server/server):
- docs/protocol/extension_binary_data.md: a body with binary tensors is the JSON object followed
  by the tensors' bytes in input order; `Inference-Header-Content-Length` gives the JSON length;
  each binary input carries parameters.binary_data_size; an output is returned as binary when
  its parameters.binary_data is true (or the request's parameters.binary_data_output is), and
  then carries parameters.binary_data_size in the response; BYTES elements are 4-byte
  little-endian length prefixed.
- src/http_server.cc: errors are `{"error": "<message>"}` with HttpCodeFromError's status
  (dataplane.HTTP_STATUS); /v2/health/ready and /v2/models/{m}/ready answer 200 or 400 with an
  empty body; model config is the ModelConfig protobuf as JSON with its proto field names.
- KServe v2 REST (docs/protocol/README.md of Triton): JSON tensor `data` is flat (row-major).

Hostile input: the body is read in chunks and refused with 413 beyond MAX_BODY (the gRPC
receive limit), whatever Content-Length claims; binary sizes must add up exactly; the JSON
header is capped; `parameters.timeout` (microseconds, Triton's request timeout) becomes the
request's deadline; element counts are checked by the data plane as for gRPC.
"""
from __future__ import annotations

import json
import logging
import socket
import threading

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format
from starlette.concurrency import run_in_threadpool

from captioner.dataplane import INVALID_ARG, DataPlane, DataPlaneError, InputTensor

log = logging.getLogger(__name__)

HEADER = "inference-header-content-length"
MAX_JSON_HEADER = 1 << 20  # the JSON part of a request (tensor metadata; JSON tensors are small here)


def _error(status: int, msg: str) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)


def _ready(ok: bool) -> Response:
    return Response(status_code=200 if ok else 400)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read in chunks and abandoned as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise DataPlaneError(INVALID_ARG, f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise DataPlaneError(INVALID_ARG, f"request body is over the limit of {limit} bytes")
    return bytes(buf)


def parse_infer_body(body: bytes, header_len: str | None) -> tuple[dict, list[InputTensor], list[dict]]:
    """An infer request body -> (request JSON, InputTensors, requested outputs)."""
    if header_len is not None:
        try:
            n = int(header_len)
        except ValueError:
            raise DataPlaneError(INVALID_ARG, f"Inference-Header-Content-Length must be an integer, got "
                                              f"{header_len!r}") from None
        if not 0 < n <= len(body):
            raise DataPlaneError(INVALID_ARG, f"Inference-Header-Content-Length {n} is outside the body's "
                                              f"{len(body)} bytes")
    else:
        n = len(body)
    if n > MAX_JSON_HEADER:
        raise DataPlaneError(INVALID_ARG, f"JSON inference header of {n} bytes is over the limit of "
                                          f"{MAX_JSON_HEADER} bytes")
    try:
        req = json.loads(body[:n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
        raise DataPlaneError(INVALID_ARG, f"failed to parse the request JSON: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise DataPlaneError(INVALID_ARG, "the request JSON must be an object with an 'inputs' list")
    binary, off = body[n:], 0
    inputs = []
    for i, t in enumerate(req["inputs"]):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise DataPlaneError(INVALID_ARG, f"inputs[{i}] must be an object with a 'name'")
        shape, dt = t.get("shape"), t.get("datatype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise DataPlaneError(INVALID_ARG, f"input '{t['name']}': 'shape' must be a list of integers")
        if not isinstance(dt, str):
            raise DataPlaneError(INVALID_ARG, f"input '{t['name']}': 'datatype' must be a string")
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or off + size > len(binary):
                raise DataPlaneError(INVALID_ARG, f"input '{t['name']}': binary_data_size {size!r} runs past the "
                                                  f"{len(binary) - off} binary bytes left in the body")
            inputs.append(InputTensor(t["name"], dt, shape, raw=binary[off:off + size]))
            off += size
        else:
            data = t.get("data")
            if not isinstance(data, list):
                raise DataPlaneError(INVALID_ARG, f"input '{t['name']}' has neither 'data' nor binary_data_size")
            inputs.append(InputTensor(t["name"], dt, shape, data=_flatten(data, t["name"])))
    if off != len(binary):
        raise DataPlaneError(INVALID_ARG, f"the body holds {len(binary) - off} binary bytes that no input's "
                                          f"binary_data_size claims")
    outs = req.get("outputs") or []
    if not isinstance(outs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outs):
        raise DataPlaneError(INVALID_ARG, "'outputs' must be a list of objects with a 'name'")
    return req, inputs, outs


def _flatten(data: list, name: str, limit: int = 1 << 20) -> list:
    """JSON tensor data may be nested (row-major) or flat; flattened with a bound on elements."""
    out, stack = [], [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
            if len(out) > limit:
                raise DataPlaneError(INVALID_ARG, f"input '{name}' holds more than {limit} JSON elements")
        else:
            stack.pop()
    return out


def encode_infer_response(res, req: dict, outs: list[dict]) -> Response:
    default_binary = bool((req.get("parameters") or {}).get("binary_data_output", False))
    want_binary = {o["name"]: (o.get("parameters") or {}).get("binary_data", default_binary) for o in outs}
    outputs, blobs = [], []
    for name, dt, arr in res.outputs:
        o = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if want_binary.get(name, default_binary):
            if dt == "BYTES":
                from tritonclient.utils import serialize_byte_tensor

                blob = serialize_byte_tensor(arr).item() if arr.size else b""
            else:
                blob = np.ascontiguousarray(arr).tobytes()
            o["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif dt == "BYTES":
            o["data"] = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
        else:
            o["data"] = arr.reshape(-1).tolist()
        outputs.append(o)
    head = {"model_name": res.model, "model_version": res.version, "outputs": outputs}
    if res.id:
        head["id"] = res.id
    body = json.dumps(head).encode()
    if not blobs:
        return Response(body, media_type="application/json")
    return Response(body + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(body))})


def create_app(plane: DataPlane, max_body: int) -> FastAPI:
    from captioner.serve import Deadline

    app = FastAPI(title="captioner serve (Triton HTTP/REST)", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(DataPlaneError)
    async def _dp_error(_request, e: DataPlaneError):
        return _error(e.http_status, str(e))

    @app.get("/v2/health/live")
    def live():
        return _ready(plane.live())

    @app.get("/v2/health/ready")
    def ready():
        return _ready(plane.ready())

    @app.get("/v2")
    def server_metadata():
        return plane.server_metadata()

    def _v(version: str | None) -> str:
        return version or ""

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    def model_metadata(model: str, version: str | None = None):
        return plane.model_metadata(model, _v(version))

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    def model_ready(model: str, version: str | None = None):
        return _ready(plane.model_ready(model, _v(version)))

    @app.get("/v2/models/{model}/config")
    @app.get("/v2/models/{model}/versions/{version}/config")
    def model_config(model: str, version: str | None = None):
        return json_format.MessageToDict(plane.config(model, _v(version)), preserving_proto_field_name=True)

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: str | None = None):
        try:
            body = await read_body(request, max_body)
        except DataPlaneError as e:
            return _error(413, str(e))
        req, inputs, outs = parse_infer_body(body, request.headers.get(HEADER))
        timeout_us = (req.get("parameters") or {}).get("timeout")
        import time

        deadline = Deadline(time.monotonic() + timeout_us / 1e6 if isinstance(timeout_us, int) and timeout_us > 0
                            else None)
        res = await run_in_threadpool(plane.infer, model, _v(version), inputs, [o["name"] for o in outs], deadline,
                                      str(req.get("id") or ""))
        return encode_infer_response(res, req, outs)

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (exclusive), or OSError naming them."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when their
        # proto says TCP; without it a response's headers and body (two writes) meet Nagle +
        # delayed ACK and every answer with a body waits ~40 ms. Set on the listener as well
        # (Linux passes it on to accepted sockets).
        s = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind(addr)
        s.listen(128)
    except OSError as e:
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {(e.strerror or str(e)).lower()} (choose another "
                      f"with --http-port)") from None
    return s


class HTTPServer:
    """uvicorn in a daemon thread over a socket bound up front (so a busy port is an error at
    start, not a log line in a thread)."""

    def __init__(self, app, sock: socket.socket, limit_concurrency: int):
        import uvicorn

        self.sock = sock
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", limit_concurrency=limit_concurrency,
                                                    timeout_keep_alive=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="http",
                                       daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_http_server(plane: DataPlane, host: str, port: int, max_body: int, limit_concurrency: int) -> HTTPServer:
    return HTTPServer(create_app(plane, max_body), bind(host, port), limit_concurrency)
