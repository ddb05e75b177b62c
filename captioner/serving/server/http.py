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

Hostile input and traffic:
- Work in progress is limited, not sockets: at most `max_in_flight` inference requests between
  admission and answer (each holds at most one copy of its body, so the bound in memory is
  max_in_flight x max_body); beyond it 503 with Retry-After, at once. Idle connections cost a
  file descriptor; a request head must arrive within HEADER_TIMEOUT_S of the connection (or of
  its first byte after a keep-alive answer), a body without a pause over BODY_IDLE_TIMEOUT_S and
  within BODY_TIMEOUT_S (408 otherwise). uvicorn's own `limit_concurrency` is not used: it
  counts open connections (uvicorn protocols/http/h11_impl.py, H11Protocol.handle_events:
  `len(self.connections) >= self.limit_concurrency`), so idle sockets made every request 503.
- The body is read into one buffer of its declared length and refused with 413 beyond max_body
  (the gRPC receive limit), whatever Content-Length claims; tensors are views into it, released
  once decoded; binary sizes must add up exactly; the JSON header is capped.
- Every malformed value is a 400 naming the field: `parameters` not an object, binary_data /
  binary_data_output not booleans, binary_data_size not a count, timeout not a count of
  microseconds, integers over 20 digits, NaN/Infinity (not JSON: refused as Triton's rapidjson
  does), `id` not a string. Health, metadata and config answer on the event loop: never queued
  behind inference.
- A client that disconnects has its request's work dropped before decoding and before the
  encoder (the data plane's Deadline sees the connection closed, as gRPC's context).
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from captioner.core.limits import (BODY_IDLE_TIMEOUT_S, BODY_TIMEOUT_S, HEADER_TIMEOUT_S, MAX_JSON_HEADER,
                                   MAX_TIMEOUT_US, RETRY_AFTER_S)
from captioner.serving.server.codec import InputTensor, raw_contents
from captioner.serving.server.dataplane import INVALID_ARG, DataPlane, DataPlaneError, parse_version
from captioner.serving.server.errors import Deadline

log = logging.getLogger(__name__)

HEADER = "inference-header-content-length"


def _error(status: int, msg: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status, headers=headers)


class BodyTimeout(Exception):
    pass


def _ready(ok: bool) -> Response:
    return Response(status_code=200 if ok else 400)


async def read_body(request: Request, limit: int, idle_s: float = BODY_IDLE_TIMEOUT_S,
                    total_s: float = BODY_TIMEOUT_S) -> memoryview:
    """The body in one buffer (allocated once from Content-Length, so no second copy is ever
    made), abandoned as soon as it passes `limit` bytes; BodyTimeout when the client pauses over
    `idle_s` or takes over `total_s` in all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise DataPlaneError(INVALID_ARG, f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    exact = declared is not None and declared.isdigit()
    buf = bytearray(int(declared)) if exact else bytearray()
    n, end = 0, time.monotonic() + total_s
    chunks = request.stream().__aiter__()
    while True:
        try:
            async with asyncio.timeout(min(idle_s, max(0.0, end - time.monotonic()))):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except ClientDisconnect:
            raise BodyTimeout("the client disconnected before sending its body") from None
        except TimeoutError:
            raise BodyTimeout(f"request body not received in time ({n} bytes after "
                              f"{total_s - max(0.0, end - time.monotonic()):.0f} s)") from None
        if n + len(chunk) > limit or (exact and n + len(chunk) > len(buf)):
            raise DataPlaneError(INVALID_ARG, f"request body is over the limit of {limit} bytes")
        if exact:
            buf[n:n + len(chunk)] = chunk
        else:
            buf += chunk
        n += len(chunk)
    return memoryview(buf)[:n]


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > 20:  # no tensor element or parameter needs more (uint64 has 20 digits)
        raise ValueError(f"integer of {len(text)} digits is out of range")
    return int(text)


def _not_json(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _params(obj: dict, where: str) -> dict:
    """An object's `parameters`: absent or a JSON object."""
    p = obj.get("parameters")
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise DataPlaneError(INVALID_ARG, f"{where}: 'parameters' must be a JSON object, got {json.dumps(p)[:80]}")
    return p


def _bool(params: dict, key: str, where: str, default: bool) -> bool:
    v = params.get(key, default)
    if not isinstance(v, bool):
        raise DataPlaneError(INVALID_ARG, f"{where}: parameter '{key}' must be true or false, got {json.dumps(v)[:80]}")
    return v


def _count(v, what: str, hi: int = (1 << 64) - 1) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise DataPlaneError(INVALID_ARG, f"{what} must be an integer in [0, {hi}], got {json.dumps(v)[:80]}")
    return v


def parse_infer_body(body: bytes | memoryview, header_len: str | None) -> tuple[dict, list[InputTensor], list[dict]]:
    """An infer request body -> (request JSON, InputTensors, requested outputs). Binary tensors
    are views into `body` (no copy)."""
    body = memoryview(body)
    if header_len is not None:
        if not (header_len.isascii() and header_len.isdigit() and len(header_len) <= 12):
            raise DataPlaneError(INVALID_ARG, f"Inference-Header-Content-Length must be an integer, got "
                                              f"{header_len[:40]!r}")
        n = int(header_len)
        if not 0 < n <= len(body):
            raise DataPlaneError(INVALID_ARG, f"Inference-Header-Content-Length {n} is outside the body's "
                                              f"{len(body)} bytes")
    else:
        n = len(body)
    if n > MAX_JSON_HEADER:
        raise DataPlaneError(INVALID_ARG, f"JSON inference header of {n} bytes is over the limit of "
                                          f"{MAX_JSON_HEADER} bytes")
    try:
        req = json.loads(bytes(body[:n]), parse_int=_parse_int, parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError;
        # RecursionError: nesting too deep
        raise DataPlaneError(INVALID_ARG, f"failed to parse the request JSON: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise DataPlaneError(INVALID_ARG, "the request JSON must be an object with an 'inputs' list")
    rp = _params(req, "request")
    if "id" in req and not isinstance(req["id"], str):
        raise DataPlaneError(INVALID_ARG, f"request: 'id' must be a string, got {json.dumps(req['id'])[:80]}")
    _bool(rp, "binary_data_output", "request", False)
    if "timeout" in rp:
        _count(rp["timeout"], "request: parameter 'timeout' (microseconds)")
    binary, off = body[n:], 0
    inputs = []
    for i, t in enumerate(req["inputs"]):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise DataPlaneError(INVALID_ARG, f"inputs[{i}] must be an object with a 'name'")
        shape, dt = t.get("shape"), t.get("datatype")
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise DataPlaneError(INVALID_ARG, f"input '{t['name']}': 'shape' must be a list of integers")
        if not isinstance(dt, str):
            raise DataPlaneError(INVALID_ARG, f"input '{t['name']}': 'datatype' must be a string")
        ip = _params(t, f"input '{t['name']}'")
        if "binary_data_size" in ip:
            size = _count(ip["binary_data_size"], f"input '{t['name']}': parameter 'binary_data_size'")
            if off + size > len(binary):
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
    for o in outs:
        _bool(_params(o, f"output '{o['name']}'"), "binary_data", f"output '{o['name']}'", False)
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
    default_binary = (req.get("parameters") or {}).get("binary_data_output", False)  # booleans: parse_infer_body
    want_binary = {o["name"]: (o.get("parameters") or {}).get("binary_data", default_binary) for o in outs}
    outputs, blobs = [], []
    for name, dt, arr in res.outputs:
        o = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if want_binary.get(name, default_binary):
            blob = raw_contents(dt, arr)
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


class ClientConnection:
    """The `context` of a data-plane Deadline for an HTTP request: inactive once the client
    has disconnected (what gRPC's context.is_active() tells the gRPC path)."""

    def __init__(self):
        self.gone = threading.Event()

    def is_active(self) -> bool:
        return not self.gone.is_set()

    async def watch(self, receive) -> None:
        """After the body is read, the next ASGI message is http.disconnect when the client
        leaves (uvicorn's RequestResponseCycle.receive also answers it once the response is sent)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone.set()


def create_app(plane: DataPlane, max_body: int, max_in_flight: int = 32,
               body_timeouts: tuple[float, float] = (BODY_IDLE_TIMEOUT_S, BODY_TIMEOUT_S)) -> FastAPI:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="captioner serve (Triton HTTP/REST)", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.in_flight = 0

    @app.exception_handler(DataPlaneError)
    async def _dp_error(_request, e: DataPlaneError):
        return _error(e.http_status, str(e))

    @app.exception_handler(StarletteHTTPException)  # unknown route, wrong method: Triton's {"error"} body
    async def _http_error(request, e: StarletteHTTPException):
        what = {404: f"no such endpoint: {request.url.path}",
                405: f"method {request.method[:16]!r} is not allowed on {request.url.path}"}
        what = what.get(e.status_code, e.detail)
        return _error(e.status_code, what, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        return _error(400, f"invalid request: {e.errors()[0].get('msg', '') if e.errors() else e}")

    # Health, metadata and config are cheap reads: answered on the event loop (async), so they
    # never wait for a worker thread held by inference.
    @app.get("/v2/health/live")
    async def live():
        return _ready(plane.live())

    @app.get("/v2/health/ready")
    async def ready():
        return _ready(plane.ready())

    @app.get("/v2")
    async def server_metadata():
        return plane.server_metadata()

    def _v(version: str | None) -> str:
        if version is not None:
            parse_version(version)  # 400 for a version that is not a number
        return version or ""

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str | None = None):
        return plane.model_metadata(model, _v(version))

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str | None = None):
        return _ready(plane.model_ready(model, _v(version)))

    @app.get("/v2/models/{model}/config")
    @app.get("/v2/models/{model}/versions/{version}/config")
    async def model_config(model: str, version: str | None = None):
        return json_format.MessageToDict(plane.config(model, _v(version)), preserving_proto_field_name=True)

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: str | None = None):
        if app.state.in_flight >= max_in_flight:  # checked and taken with no await between: one event loop
            return _error(503, f"server busy: {max_in_flight} inference requests in progress, retry later",
                          {"Retry-After": str(RETRY_AFTER_S)})
        app.state.in_flight += 1
        try:
            return await _infer(model, request, version)
        finally:
            app.state.in_flight -= 1

    async def _infer(model: str, request: Request, version: str | None):
        v = _v(version)
        try:
            body = await read_body(request, max_body, *body_timeouts)
        except DataPlaneError as e:
            return _error(413, str(e), {"Connection": "close"})
        except BodyTimeout as e:
            return _error(408, str(e), {"Connection": "close"})
        req, inputs, outs = parse_infer_body(body, request.headers.get(HEADER))
        del body  # the inputs are views into it: released when the data plane has decoded them
        timeout_us = (req.get("parameters") or {}).get("timeout")
        deadline_at = time.monotonic() + timeout_us / 1e6 if timeout_us and timeout_us <= MAX_TIMEOUT_US else None
        conn = ClientConnection()
        watcher = asyncio.create_task(conn.watch(request.receive))
        try:
            res = await run_in_threadpool(plane.infer, model, v, inputs, [o["name"] for o in outs],
                                          Deadline(deadline_at, conn), req.get("id") or "")
        finally:
            watcher.cancel()
        return encode_infer_response(res, req, outs)

    return app


def return_large_buffers_to_the_os(threshold: int = 1 << 20) -> None:
    """Have glibc map every allocation of `threshold` bytes or more on its own and unmap it on
    free. By default glibc raises its mmap threshold to the size of each large block freed (up
    to 32 MiB; mallopt(3), M_MMAP_THRESHOLD), after which 16 MiB request bodies come from the
    heap and stay resident once freed: measured, 16 concurrent 16 MiB bodies grew the server by
    2.0 body copies with the threshold floating, ~1 with it fixed. Setting it fixes it. A no-op
    off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):
        pass


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


def _protocol(header_timeout: float):
    """uvicorn's h11 protocol with a deadline on each request head: from the connection (or the
    first byte after an answer) to the end of the head. uvicorn has none: a fresh connection has
    no timer (timeout_keep_alive is armed only after a response, H11Protocol.on_response_complete)
    and any byte cancels it (data_received -> _unset_keepalive_if_required), so a client sending a
    header byte a second held its connection (and with limit_concurrency, a request slot) forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimedH11(H11Protocol):
        _head_timer = None
        _head_cycle = None

        def _arm(self) -> None:
            self._head_cycle = self.cycle
            self._head_timer = self.loop.call_later(header_timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                log.info("closing a connection whose request head did not arrive in %.0f s", header_timeout)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first byte of the next request on a kept-alive connection
            super().data_received(data)
            if self.cycle is not self._head_cycle:  # a request head was parsed
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeadTimedH11


class HTTPServer:
    """uvicorn in a daemon thread over a socket bound up front (so a busy port is an error at
    start, not a log line in a thread)."""

    def __init__(self, app, sock: socket.socket, header_timeout: float = HEADER_TIMEOUT_S):
        import uvicorn

        self.sock = sock
        self.port = sock.getsockname()[1]
        # no limit_concurrency: it counts connections (see the module docstring); the app bounds work
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=_protocol(header_timeout),
                                                    timeout_keep_alive=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="http",
                                       daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_http_server(plane: DataPlane, host: str, port: int, max_body: int, max_in_flight: int,
                      header_timeout: float = HEADER_TIMEOUT_S,
                      body_timeouts: tuple[float, float] = (BODY_IDLE_TIMEOUT_S, BODY_TIMEOUT_S)) -> HTTPServer:
    """Requests in flight are bounded by `max_in_flight`: memory max_in_flight x max_body."""
    return_large_buffers_to_the_os()
    return HTTPServer(create_app(plane, max_body, max_in_flight, body_timeouts), bind(host, port), header_timeout)
