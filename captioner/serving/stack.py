"""The front door after `make demo`: a model server (gRPC + Triton HTTP/REST + metrics) and
`captioner web` over a model repository, kept running until Ctrl-C (`captioner demo --serve`).
The model server is the real tritonserver where it runs (captioner.serving.triton_server), else
`captioner serve` (ModelServer, also the demo's server for captions). Both run as child
processes on 127.0.0.1 and are stopped by their PIDs."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Triton's ports (gRPC, HTTP, metrics) and the gateway's; a busy one is replaced by a free one
DEFAULT_PORTS = {"grpc": 8001, "http": 8000, "metrics": 8002, "web": 8080}


def _port(preferred: int, host: str) -> int:
    with socket.socket() as s:
        try:
            s.bind((host, preferred))
        except OSError:
            s.bind((host, 0))
        return s.getsockname()[1]


def urls(host: str, ports: dict) -> dict:
    return {"page": f"http://{host}:{ports['web']}/", "model server": f"http://{host}:{ports['http']}/v2 (HTTP), "
            f"{host}:{ports['grpc']} (gRPC), http://{host}:{ports['metrics']}/metrics"}


def print_urls(host: str = "127.0.0.1", ports: dict | None = None, live: bool = False) -> None:
    u = urls(host, ports or DEFAULT_PORTS)
    if not live:
        print("\nTry your own photos of shapes: `captioner demo --serve` keeps the model server and the web page "
              "running until Ctrl-C at")
    print(f"  web page:     {u['page']}\n  model server: {u['model server']}", flush=True)


def _wait(url: str, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready at {url} after {timeout:.0f}s")


class ModelServer:
    """The model server the demo runs over `repo`: the real tritonserver (captioner.serving.triton_server:
    the nvidia-pytriton wheel's, with the cluster's flags: explicit control loading the ensemble,
    model-repository protocol restricted to `key`, a fresh one when None) where it runs, else
    `captioner serve` (restricted to `key` when given), saying why. `name` says which;
    `ports` are its gRPC/HTTP/metrics ports on `host` (free ones where not given)."""

    def __init__(self, repo: str | Path, key: str | None, run_dir: str | Path, host: str = "127.0.0.1",
                 ports: dict | None = None):
        from captioner.core.deployment import CONTROL_HEADER, TRITON_SERVER_VERSION
        from captioner.serving import triton_server

        self.triton = None
        self.host = host
        self.ports = {k: (ports or {}).get(k) or _port(0, host) for k in ("grpc", "http", "metrics")}
        try:
            why = triton_server.why_not_here()
            if why:
                raise triton_server.TritonUnavailable(why)
            print("starting tritonserver (first run: fetches the nvidia-pytriton wheel and builds its Python "
                  "environment under ~/.cache/captioner/triton) ...", flush=True)
            self.triton = triton_server.start(repo, Path(run_dir) / "tritonserver", key or secrets.token_hex(16),
                                              ports=self.ports, host=host)
            self.name = f"tritonserver {TRITON_SERVER_VERSION} (nvidia-pytriton wheel)"
            self.process = self.triton.process
            return
        except (triton_server.TritonUnavailable, RuntimeError) as e:
            print(f"the real Triton server cannot run here ({e}); serving with `captioner serve` instead", flush=True)
        self.name = "`captioner serve`"
        extra = ["--model-control-mode", "explicit", "--grpc-restricted-protocol",
                 f"model-repository:{CONTROL_HEADER}={key}"] if key else []
        self.process = subprocess.Popen([sys.executable, "-m", "captioner", "serve", str(repo), "--host", host,
                                         *(a for k, v in self.ports.items() for a in (f"--{k}-port", str(v))),
                                         *extra], env=os.environ.copy())
        try:
            _wait(f"http://{host}:{self.ports['http']}/v2/health/live", self.process, "captioner serve")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:  # gRPC HOST:PORT
        return f"{self.host}:{self.ports['grpc']}"

    def stop(self) -> None:
        if self.triton is not None:
            self.triton.stop()
        elif self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serve_until_interrupted(repo: str | Path, host: str = "127.0.0.1", ports: dict | None = None,
                            run_dir: str | Path | None = None) -> int:
    """Start the model server (ModelServer) + web over `repo`, print their URLs and which model
    server runs, wait for Ctrl-C / SIGTERM, stop both. The real server's log and backend folder
    go under `run_dir` (default: `front-door` next to a local `repo`)."""
    want = {**DEFAULT_PORTS, **(ports or {})}
    got = {k: _port(v, host) for k, v in want.items()}
    if run_dir is None:
        run_dir = Path(repo).resolve().parent / "front-door" if "://" not in str(repo) else \
            Path(tempfile.mkdtemp(prefix="captioner-front-door-"))
    server, web = None, None
    stop = {"now": False}

    def _term(signum, _frame):
        stop["now"] = True

    old = {s: signal.signal(s, _term) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = ModelServer(repo, None, run_dir, host, got)
        _wait(f"http://{host}:{got['http']}/v2/health/ready", server.process, server.name)
        web = subprocess.Popen([sys.executable, "-m", "captioner", "web", "--url", server.url,
                                "--host", host, "--port", str(got["web"])], env=os.environ.copy())
        _wait(f"http://{host}:{got['web']}/readyz", web, "captioner web")
        print(f"\nserving {repo} with {server.name}; press Ctrl-C to stop", flush=True)
        print_urls(host, got, live=True)
        procs = [server.process, web]
        while not stop["now"] and all(p.poll() is None for p in procs):
            time.sleep(0.2)
        dead = [p for p in procs if p.poll() is not None]
        return 1 if dead and not stop["now"] else 0
    finally:
        if web is not None:
            if web.poll() is None:
                web.terminate()
            try:
                web.wait(timeout=30)
            except subprocess.TimeoutExpired:
                web.kill()
                web.wait()
        if server is not None:
            server.stop()
        for s, h in old.items():
            signal.signal(s, h)
        print(f"stopped captioner web and {server.name if server else 'the model server'}", flush=True)


def front_door(repo: str | Path, serve: bool) -> None:
    """The end of `captioner demo`: keep serving with --serve, else say how."""
    if serve:
        rc = serve_until_interrupted(repo)
        if rc:
            raise SystemExit("captioner demo --serve: a server exited unexpectedly (see its log above)")
    else:
        print_serve_hint(repo)


def _shown(path: str | Path) -> str:
    """`path` relative to the current folder when it is under it (what a user would type)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def serve_commands(repo: str | Path, ports: dict | None = None) -> list[str]:
    """The two commands that serve a finished repository (no retraining): the model server and the page."""
    p = ports or DEFAULT_PORTS
    return [f"captioner serve {_shown(repo)} --grpc-port {p['grpc']} --http-port {p['http']} "
            f"--metrics-port {p['metrics']}",
            f"captioner web --url 127.0.0.1:{p['grpc']} --port {p['web']}"]


def print_serve_hint(repo: str | Path) -> None:
    serve, web = serve_commands(repo)
    u = urls("127.0.0.1", DEFAULT_PORTS)
    print(f"\nTry your own photos of shapes: serve the finished model (ready in seconds, nothing retrains) with\n"
          f"  {serve}\nand, in a second terminal,\n  {web}\nthen open the web page {u['page']} "
          f"(model server: {u['model server']}).", flush=True)


if __name__ == "__main__":  # python -m captioner.serving.stack REPO [grpc http metrics web]
    ps = dict(zip(("grpc", "http", "metrics", "web"), map(int, sys.argv[2:6])))
    raise SystemExit(serve_until_interrupted(sys.argv[1], ports=ps))
