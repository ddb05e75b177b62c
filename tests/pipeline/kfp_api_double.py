"""A recording stand-in for the Kubeflow Pipelines API server (v2beta1 REST, the paths and
JSON fields of kfp_server_api's HealthzServiceApi, ExperimentServiceApi and RunServiceApi,
which kfp.Client calls): answers the calls `create_run_from_pipeline_func` makes and keeps
every request (method, path, query, headers, body) for the test to inspect. 127.0.0.1 only."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class KfpApiDouble:
    def __init__(self, multi_user: bool = True):
        self.requests: list[dict] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, obj, code=200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _record(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"null") if n else None
                u = urlparse(self.path)
                outer.requests.append({"method": self.command, "path": u.path, "query": parse_qs(u.query),
                                       "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                return u.path, body

            def do_GET(self):  # noqa: N802
                path, _ = self._record()
                if path == "/apis/v2beta1/healthz":
                    return self._reply({"multi_user": multi_user})
                if path == "/apis/v2beta1/experiments":
                    return self._reply({"experiments": [], "total_size": 0})
                return self._reply({"error": f"no route {path}"}, 404)

            def do_POST(self):  # noqa: N802
                path, body = self._record()
                if path == "/apis/v2beta1/experiments":
                    return self._reply({"experiment_id": "exp-1", **(body or {})})
                if path == "/apis/v2beta1/runs":
                    return self._reply({"run_id": "run-1", "display_name": body.get("display_name"),
                                        "experiment_id": body.get("experiment_id"), "state": "PENDING"})
                return self._reply({"error": f"no route {path}"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
