"""The front door after `make demo`: `captioner serve` (gRPC + Triton HTTP/REST + metrics) and
`captioner web` over a model repository, kept running until Ctrl-C (`captioner demo --serve`).
Both run as child processes on 127.0.0.1 and are stopped by their PIDs."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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


def serve_until_interrupted(repo: str | Path, host: str = "127.0.0.1", ports: dict | None = None) -> int:
    """Start serve + web over `repo`, print their URLs, wait for Ctrl-C / SIGTERM, stop both."""
    want = {**DEFAULT_PORTS, **(ports or {})}
    got = {k: _port(v, host) for k, v in want.items()}
    env = os.environ.copy()
    procs: list[subprocess.Popen] = []
    stop = {"now": False}

    def _term(signum, _frame):
        stop["now"] = True

    old = {s: signal.signal(s, _term) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "captioner", "serve", str(repo), "--host", host,
                                       "--grpc-port", str(got["grpc"]), "--http-port", str(got["http"]),
                                       "--metrics-port", str(got["metrics"])], env=env))
        _wait(f"http://{host}:{got['http']}/v2/health/ready", procs[0], "captioner serve")
        procs.append(subprocess.Popen([sys.executable, "-m", "captioner", "web", "--url", f"{host}:{got['grpc']}",
                                       "--host", host, "--port", str(got["web"])], env=env))
        _wait(f"http://{host}:{got['web']}/readyz", procs[1], "captioner web")
        print(f"\nserving {repo}; press Ctrl-C to stop", flush=True)
        print_urls(host, got, live=True)
        while not stop["now"] and all(p.poll() is None for p in procs):
            time.sleep(0.2)
        dead = [p for p in procs if p.poll() is not None]
        return 1 if dead and not stop["now"] else 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for s, h in old.items():
            signal.signal(s, h)
        print("stopped captioner web and captioner serve", flush=True)


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


if __name__ == "__main__":  # python -m captioner.stack REPO [grpc http metrics web]
    ps = dict(zip(("grpc", "http", "metrics", "web"), map(int, sys.argv[2:6])))
    raise SystemExit(serve_until_interrupted(sys.argv[1], ports=ps))
