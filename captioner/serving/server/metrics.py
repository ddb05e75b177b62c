"""Prometheus metrics of `captioner serve` with Triton's names, labels and types, so the same
prometheus-adapter rule (k8s/prometheus-adapter/values.yaml) and dashboards work on both servers.

Followed: triton-inference-server/server docs/user_guide/metrics.md ("Inference Request
Metrics"): per-model counters labelled {model, version}, named WITHOUT a `_total` suffix
(nv_inference_request_success, nv_inference_request_failure{reason}, nv_inference_count,
nv_inference_exec_count, nv_inference_request_duration_us, nv_inference_queue_duration_us,
nv_inference_compute_infer_duration_us). Triton (prometheus-cpp) writes `# TYPE <name> counter`
and samples named `<name>`; prometheus_client's text writer renames every counter family to
`<name>_total` (exposition.generate_latest), which the adapter rule and Triton dashboards do not
query. So the families are prometheus_client Metrics from a collector, written by `render`,
which keeps the names as Triton writes them (values and label escaping by prometheus_client).
"""
from __future__ import annotations

import logging
import threading

from prometheus_client.core import Metric
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from captioner.core.limits import SCRAPE_READ_TIMEOUT_S

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = logging.getLogger(__name__)

FAMILIES = [  # (name, help, _Stats attribute)
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes", "success"),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes", "failure"),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)", "inference_count"),
    ("nv_inference_exec_count", "Number of model executions performed (does not include cached requests)",
     "exec_count"),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds "
                                         "(includes cached requests)", "request_us"),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds "
                                       "(includes cached requests)", "queue_us"),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds "
                                               "(does not include cached requests)", "compute_us"),
]
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


class TritonCollector:
    """Reads the DataPlane's statistics at scrape time."""

    def __init__(self, plane):
        self.plane = plane

    def collect(self):
        stats = self.plane.stats()
        for name, doc, attr in FAMILIES:
            m = Metric(name, doc, "counter")
            for (model, version), s in sorted(stats.items()):
                labels = {"model": model, "version": version}
                if attr == "failure":
                    for reason in FAILURE_REASONS:
                        m.add_sample(name, {**labels, "reason": reason}, float(s.failure.get(reason, 0)))
                else:
                    m.add_sample(name, labels, float(getattr(s, attr)))
            yield m


def _label(v: str) -> str:  # the text format's label-value escaping
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def render(registry) -> bytes:
    """Prometheus text format 0.0.4 with each family's own name on HELP, TYPE and samples."""
    out = []
    for m in registry.collect():
        doc = m.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {m.name} {doc}\n# TYPE {m.name} {m.type}\n")
        for s in m.samples:
            labels = ",".join(f'{k}="{_label(v)}"' for k, v in s.labels.items())
            out.append(f"{s.name}{{{labels}}} {floatToGoString(s.value)}\n" if labels
                       else f"{s.name} {floatToGoString(s.value)}\n")
    return "".join(out).encode()


def start_metrics_server(plane, host: str, port: int):
    """Serve /metrics on host:port in a daemon thread; returns the server (its bound `port`,
    `stop()`). OSError when the port cannot be bound (the message names it)."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(TritonCollector(plane))

    def app(environ, start_response):
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: the metrics are at /metrics\n"]
        body = render(registry)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))])
        return [body]

    class Quiet(WSGIRequestHandler):
        timeout = SCRAPE_READ_TIMEOUT_S  # socket timeout: an idle or slow connection ends its own thread

        def log_message(self, *a):  # scrapes every few seconds: not worth a log line each
            pass

    class Server(ThreadingMixIn, WSGIServer):
        """One thread per connection (wsgiref's WSGIServer alone serves one connection at a time:
        an idle connection blocked every scrape; `daemon_threads` means nothing without
        ThreadingMixIn). prometheus_client's own exposition.ThreadingWSGIServer is the same."""
        daemon_threads = True

        @property
        def port(self) -> int:
            return self.server_address[1]

        def stop(self) -> None:
            self.shutdown()

        def handle_error(self, request, client_address):
            import sys

            if isinstance(sys.exc_info()[1], (TimeoutError, ConnectionError)):
                return  # a client that went quiet or away: not a server error worth a traceback
            super().handle_error(request, client_address)

    try:
        httpd = make_server(host, port, app, server_class=Server, handler_class=Quiet)
    except OSError as e:
        raise OSError(f"cannot listen for metrics on {host}:{port}: {e.strerror or e} (choose another with "
                      f"--metrics-port)") from None
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return httpd
