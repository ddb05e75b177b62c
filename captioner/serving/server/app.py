"""`captioner serve`: a local gRPC server speaking Triton's protocol (KServe v2, built on
`tritonclient.grpc.service_pb2_grpc`) over an exported model repository.

It serves the same model names, tensors and ModelConfig answers as Triton would for the
repository, running the ONNX models in onnxruntime and the Python-backend logic in process
(the same `captioner.serving.core` functions), so client code is identical against both.
Concurrent requests to a batching model are batched up to its `max_batch_size` within its
dynamic-batching queue delay. Bad requests get INVALID_ARGUMENT / NOT_FOUND naming the
problem; the server keeps serving.

This module is the process lifecycle: it loads the repository (captioner.serving.server.runtime),
puts one DataPlane over it (captioner.serving.server.dataplane) and starts the fronts that
translate to it: gRPC (captioner.serving.server.grpc), HTTP/REST (captioner.serving.server.http)
and Prometheus metrics (captioner.serving.server.metrics); the limits are captioner.core.limits.

Hostile requests are bounded: images are decoded in a bounded pool outside the
batcher (a light lane and a heavy lane, so a request of large images cannot hold up a small
one), each request has a pixel budget, BYTES tensors are counted while their length prefixes
are walked, messages and concurrent RPCs are capped, and work for a client that has gone
(deadline passed, cancelled) is dropped before decoding and before the encoder.
"""
from __future__ import annotations

import logging
import signal
import socket
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import grpc
from tritonclient.grpc import service_pb2_grpc

from captioner.core.limits import MAX_CONCURRENT_RPCS, MAX_RECEIVE_MESSAGE, MAX_SEND_MESSAGE
from captioner.serving.server.dataplane import DataPlane
from captioner.serving.server.grpc import Servicer
from captioner.serving.server.http import start_http_server
from captioner.serving.server.metrics import start_metrics_server
from captioner.serving.server.runtime import Repository

log = logging.getLogger(__name__)


class BindError(OSError):
    """A port cannot be listened on (message names host, port and the reason)."""


@dataclass
class Server:
    """A started `captioner serve`: the gRPC server, the repository it runs, the one data plane
    every front hands off to, the HTTP/metrics fronts (each has stop()) and the bound gRPC port."""
    grpc: grpc.Server
    repo: Repository
    plane: DataPlane
    port: int
    fronts: list = field(default_factory=list)

    def stop(self, grace: float = 5.0) -> None:
        """Stop the fronts, then gRPC (in-flight RPCs get `grace` seconds), then the runtime."""
        for f in self.fronts:
            f.stop()
        self.grpc.stop(grace=grace).wait()
        self.repo.close()


def _bind_error(host: str, port: int) -> str:
    """Why (host, port) cannot be bound, in the operating system's words."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.bind(addr)
    except OSError as e:
        return (e.strerror or str(e)).lower()
    return "gRPC could not bind it"


def parse_restricted(spec: str | None) -> tuple[str, str] | None:
    """Triton's `--grpc-restricted-protocol=model-repository:KEY=VALUE` -> (KEY, VALUE)."""
    if not spec:
        return None
    proto, _, kv = spec.partition(":")
    key, eq, value = kv.partition("=")
    if proto != "model-repository" or not eq or not key or not value:
        raise ValueError(f"--grpc-restricted-protocol must be 'model-repository:KEY=VALUE', got {spec!r}")
    return key.lower(), value  # gRPC metadata keys are lower case


def start_server(repo: str | Path, host: str = "127.0.0.1", port: int = 8001, workers: int = MAX_CONCURRENT_RPCS,
                 threads: int = 0, control: str = "none", load: Iterable[str] = (), restricted: str | None = None,
                 max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS, http_port: int | None = None,
                 metrics_port: int | None = None) -> Server:
    guard = parse_restricted(restricted)
    r = Repository(repo, threads, control, load)
    plane = DataPlane(r)  # the one data plane behind every front end (gRPC here, HTTP and metrics below)
    # so_reuseport 0: bind exclusively. gRPC sets SO_REUSEPORT by default on Linux, so a second
    # server on a busy port would start and share its requests with the first.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
                         options=[("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE),
                                  ("grpc.max_send_message_length", MAX_SEND_MESSAGE),
                                  ("grpc.so_reuseport", 0)],
                         maximum_concurrent_rpcs=max_concurrent_rpcs)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(plane, guard), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpcio >= 1.5x raises instead of returning 0
        bound = 0
    if bound == 0:
        r.close()
        raise BindError(f"cannot listen on {host}:{port}: {_bind_error(host, port)} (port {port}; is another "
                      f"server running there? choose another with --grpc-port)")
    try:  # HTTP and metrics listen before gRPC answers, so a client that saw gRPC ready finds them up
        fronts = start_fronts(plane, host, http_port, metrics_port)
    except BindError:
        r.close()
        raise
    server.start()
    return Server(server, r, plane, bound, fronts)


def start_fronts(plane: DataPlane, host: str, http_port: int | None, metrics_port: int | None) -> list:
    """Triton's other two ports over the same data plane: HTTP/REST (captioner.serving.server.http) and
    Prometheus /metrics (captioner.serving.server.metrics). Returns the started servers (each has stop())."""
    started = []
    try:
        if http_port is not None:
            h = start_http_server(plane, host, http_port, MAX_RECEIVE_MESSAGE, MAX_CONCURRENT_RPCS)
            log.info("HTTP/REST on %s:%d", host, h.port)
            started.append(h)
        if metrics_port is not None:
            m = start_metrics_server(plane, host, metrics_port)
            log.info("metrics on http://%s:%d/metrics", host, m.port)
            started.append(m)
    except OSError as e:
        for x in started:
            x.stop()
        raise BindError(str(e)) from None
    return started


def serve_forever(repo: str | Path, host: str = "127.0.0.1", port: int = 8001, threads: int = 0,
                  control: str = "none", load: Iterable[str] = (), restricted: str | None = None,
                  http_port: int | None = None, metrics_port: int | None = None) -> None:
    try:
        s = start_server(repo, host, port, threads=threads, control=control, load=load,
                                        restricted=restricted, http_port=http_port, metrics_port=metrics_port)
    except BindError as e:
        raise SystemExit(f"captioner serve: {e}") from None
    log.info("serving %s on %s:%d (model control %s; loaded: %s)", repo, host, s.port, control,
             ", ".join(sorted(s.repo.loaded)) or "none")
    stop = threading.Event()

    def _term(signum, _frame):
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    stop.wait()
    s.stop(grace=5)
    log.info("server stopped cleanly")
