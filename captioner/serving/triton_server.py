"""The real tritonserver, run from the project: the server that the `nvidia-pytriton` wheel bundles
(tritonserver 2.51.0 = NGC release 24.10, with the Python backend and S3 support), started
with the flags the cluster's Deployment passes (captioner.core.deployment.triton_server_args), used
by the tests and `make demo`; `captioner serve` stays the fallback where it cannot run.

Everything lives in a cache folder (`$CAPTIONER_CACHE/triton`, default ~/.cache/captioner/triton),
never in site-packages or the project's environment:
- the wheel, fetched once with `pip download --no-deps` (its Python package pins numpy<2 and
  tritonclient~=2.50, which must not pin ours) and checked against WHEEL_SHA256, unpacked;
- the environment the server's Python models run in: the Python backend's stubs in this wheel
  mis-read NumPy 2 arrays (their pybind11 predates NumPy 2's ABI: an FP32 [1.5, 2.25, -3, 4]
  arrives as [1.5, 1.5, 1.5, 1.5], BYTES inputs as their first byte repeated), so the
  models run in a venv of the Python the stub links, holding captioner's base requirements,
  `numpy<2` and Triton 24.10's onnxruntime (TRITON_ONNXRUNTIME);
- per start, a run folder: the backend directory (the stub for that Python copied next to
  libtriton_python.so; a copied binary loses its RPATH-relative libraries, hence
  LD_LIBRARY_PATH to `nvidia_pytriton.libs`), the Python-based `onnxruntime` backend
  (captioner/serving/triton/onnxruntime_backend.py: the wheel has no onnxruntime backend), and a venv
  without pip whose `.pth` puts this source tree and the cached environment on the models'
  path (the stub's embedded Python takes its prefix from the first `python3` on PATH;
  PYTHONPATH does not reach it).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from captioner.core.deployment import TRITON_ONNXRUNTIME, TRITON_SERVER_VERSION, triton_server_args

log = logging.getLogger("captioner.serving.triton_server")

PYTRITON_VERSION = "0.7.0"  # bundles tritonserver TRITON_SERVER_VERSION (2.51.0, release 24.10)
WHEEL = f"nvidia_pytriton-{PYTRITON_VERSION}-py3-none-manylinux_2_35_x86_64.whl"
WHEEL_SHA256 = "21f063ff93bb426d0c06b7a55e7eb9efcfe62c0dddd9a908e9877e18710128df"
MIN_GLIBC = (2, 35)
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the tree whose `captioner` the models import


class TritonUnavailable(RuntimeError):
    """The real server cannot run here; the message is the one-line reason."""


def cache_dir() -> Path:
    return Path(os.environ.get("CAPTIONER_CACHE") or Path.home() / ".cache" / "captioner") / "triton"


def why_not_here() -> str | None:
    """One line saying why the wheel's tritonserver cannot run on this machine, or None.
    CAPTIONER_TRITON=off switches it off (no download; `captioner serve` is used instead)."""
    if os.environ.get("CAPTIONER_TRITON", "").lower() in ("off", "0", "no", "false"):
        return f"CAPTIONER_TRITON={os.environ['CAPTIONER_TRITON']} switches the real server off"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"the nvidia-pytriton wheel's tritonserver is built for Linux x86_64, this is " \
               f"{platform.system()} {platform.machine()}"
    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    if not libc or not libc.startswith("glibc "):
        return f"tritonserver needs glibc >= {'.'.join(map(str, MIN_GLIBC))} (this C library: {libc or 'unknown'})"
    have = tuple(int(x) for x in libc.split()[1].split(".")[:2])
    if have < MIN_GLIBC:
        return f"tritonserver needs glibc >= {'.'.join(map(str, MIN_GLIBC))}, this machine has {libc.split()[1]}"
    return None


# ------------------------------------------------------------------ the wheel
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(cache: Path | None = None) -> Path:
    """The unpacked wheel (a folder holding `pytriton/tritonserver/` and `nvidia_pytriton.libs/`),
    downloaded and checked on first use."""
    cache = cache or cache_dir()
    out = cache / f"nvidia_pytriton-{PYTRITON_VERSION}"
    if (out / ".complete").exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    if not wheel.exists() or _sha256(wheel) != WHEEL_SHA256:
        log.info("downloading nvidia-pytriton %s (tritonserver %s, 55 MB) into %s", PYTRITON_VERSION,
                 TRITON_SERVER_VERSION, cache)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                "--platform", "manylinux_2_35_x86_64", "--disable-pip-version-check",
                                f"nvidia-pytriton=={PYTRITON_VERSION}", "-d", tmp], capture_output=True, text=True)
            got = Path(tmp) / WHEEL
            if r.returncode != 0 or not got.exists():
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                raise TritonUnavailable(f"cannot download nvidia-pytriton=={PYTRITON_VERSION}: {last}")
            os.replace(got, wheel)
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise TritonUnavailable(f"{WHEEL} has sha256 {digest}, expected {WHEEL_SHA256}: refusing to run it")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                z.extract(info, tmp)
                mode = info.external_attr >> 16  # zip keeps the Unix mode here; extract() drops it
                if mode & 0o111:
                    os.chmod(Path(tmp) / info.filename, mode & 0o777)
        (Path(tmp) / ".complete").touch()
        try:
            os.rename(tmp, out)
        except OSError:  # another process unpacked it meanwhile
            if not (out / ".complete").exists():
                raise
        else:
            os.mkdir(tmp)  # TemporaryDirectory removes it on exit
    return out


# ------------------------------------------------------------------ the models' Python environment
def _stub_versions(wheel: Path) -> list[str]:
    return sorted((p.name for p in (wheel / "pytriton/tritonserver/python_backend_stubs").iterdir()),
                  key=lambda v: tuple(map(int, v.split("."))))


def server_python(wheel: Path) -> tuple[Path, str, Path]:
    """(interpreter, "X.Y", its shared-library folder): a Python with a shared libpython for
    which the wheel ships a stub. CAPTIONER_TRITON_PYTHON picks one; otherwise this
    interpreter's base Python, then the system's /usr/bin/python3.X."""
    stubs = _stub_versions(wheel)
    cands = [os.environ["CAPTIONER_TRITON_PYTHON"]] if os.environ.get("CAPTIONER_TRITON_PYTHON") else [
        getattr(sys, "_base_executable", sys.executable), *(f"/usr/bin/python{v}" for v in reversed(stubs))]
    tried = []
    for c in cands:
        if not Path(c).exists():
            continue
        r = subprocess.run([c, "-c", "import sys, sysconfig as s; print('%d.%d' % sys.version_info[:2]); "
                                    "print(s.get_config_var('LIBDIR')); print(s.get_config_var('INSTSONAME')); "
                                    "import venv, ensurepip"], capture_output=True, text=True)
        lines = r.stdout.split()
        if r.returncode != 0 or len(lines) < 3:
            tried.append(f"{c} (no venv/ensurepip module)")
            continue
        ver, libdir, soname = lines[:3]
        shared = soname.startswith("libpython") and ".so" in soname and (
            (Path(libdir) / soname).exists() or Path(f"/lib/x86_64-linux-gnu/{soname}").exists())
        if ver not in stubs or not shared:
            tried.append(f"{c} ({ver}{'' if shared else ', no shared libpython'})")
            continue
        return Path(c), ver, Path(libdir)
    raise TritonUnavailable(f"no Python to run Triton's Python models: need a shared-libpython Python "
                            f"{'/'.join(stubs)} with venv (tried {', '.join(tried) or 'none'}; on Debian: "
                            f"apt-get install python3-venv; or set CAPTIONER_TRITON_PYTHON)")


def server_requirements() -> list[str]:
    """What the Python models import: captioner's base requirements with NumPy held below 2,
    and onnxruntime at the version Triton 24.10 ships."""
    base = ["numpy>=1.24", "pillow>=10", "tokenizers>=0.20", "pyyaml>=6", "tqdm>=4.66"]
    try:
        from importlib.metadata import requires

        base = [r for r in (requires("captioner") or []) if "extra ==" not in r] or base
    except Exception:  # noqa: BLE001 - not installed: the list above is pyproject's
        pass
    return sorted([r for r in base if not r.startswith("numpy")] + ["numpy>=1.24,<2",
                                                                     f"onnxruntime=={TRITON_ONNXRUNTIME}"])


def build_env(python: Path, version: str, cache: Path | None = None) -> Path:
    """The cached venv (built once per requirement list) whose site-packages the models use."""
    cache = cache or cache_dir()
    reqs = server_requirements()
    tag = hashlib.sha256("\n".join([str(python), *reqs]).encode()).hexdigest()[:12]
    env = cache / f"env-py{version}-{tag}"
    if (env / ".complete").exists():
        return env
    cache.mkdir(parents=True, exist_ok=True)
    log.info("building the Python environment of Triton's models in %s (%s)", env, ", ".join(reqs))
    tmp = Path(tempfile.mkdtemp(prefix=env.name + ".", dir=cache))
    try:
        subprocess.run([str(python), "-m", "venv", str(tmp)], check=True, capture_output=True)
        r = subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            *reqs], capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise TritonUnavailable(f"cannot install {' '.join(reqs)} for {python}: {last}")
        (tmp / ".complete").touch()
        try:
            os.rename(tmp, env)
        except OSError:
            if not (env / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return env


def _site_packages(env: Path, version: str) -> Path:
    return env / "lib" / f"python{version}" / "site-packages"


# ------------------------------------------------------------------ one running server
@dataclass
class TritonServer:
    process: subprocess.Popen
    run_dir: Path
    log_path: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:  # gRPC HOST:PORT, as `captioner caption --url` takes
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 180.0, models: tuple[str, ...] = ()) -> None:
        """Until /v2/health/ready answers 200 and each of `models` is ready; a clear error
        naming the log when the server exits or the time runs out."""
        end = time.monotonic() + timeout
        paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in models)]
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with status {self.process.returncode} before it was "
                                   f"ready; see {self.log_path}")
            try:
                if all(urllib.request.urlopen(f"http://{self.http_url}{p}", timeout=2).status == 200 for p in paths):
                    return
            except OSError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s ({', '.join(paths)}); "
                                   f"see {self.log_path}")
            time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM by PID (Triton unloads its models and exits), SIGKILL after `timeout`."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.run_dir / "backends", ignore_errors=True)
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(cache: Path | None = None) -> dict:
    """Everything a start needs, built or found in the cache: raises TritonUnavailable with
    the one-line reason where the real server cannot run."""
    why = why_not_here()
    if why:
        raise TritonUnavailable(why)
    wheel = fetch_wheel(cache)
    python, version, libdir = server_python(wheel)
    env = build_env(python, version, cache)
    return {"wheel": wheel, "python": python, "version": version, "libdir": libdir, "env": env}


def server_flags(repository: str, key: str, mode: str = "explicit") -> list[str]:
    """The cluster's flags (deployment.triton_server_args) for `repository` and `key`; mode
    "none" swaps explicit model control (and its --load-model) for --model-control-mode=none."""
    args = triton_server_args(repository, key)
    if mode == "none":
        args = [a for a in args if not a.startswith(("--model-control-mode=", "--load-model="))]
        args.insert(1, "--model-control-mode=none")
    elif mode != "explicit":
        raise ValueError(f"model control mode must be 'explicit' or 'none', got {mode!r}")
    return args


def start(repository: str | Path, run_dir: str | Path, key: str, mode: str = "explicit", env: dict | None = None,
          site_packages: list[str | Path] | None = None, prepared: dict | None = None, wait: bool = True,
          timeout: float = 180.0, ports: dict | None = None, host: str = "127.0.0.1") -> TritonServer:
    """Start tritonserver on `host` (127.0.0.1; `ports` names its "http", "grpc" and "metrics"
    ports, free ones where not given) over `repository`
    (a folder or s3://HOST:PORT/bucket/prefix) with the cluster's flags and control `key`.
    `env` adds variables (the AWS_* a Secret gives); `site_packages` replaces the cached
    environment on the models' path (tests use it to show the NumPy-2 failure)."""
    p = prepared or prepare()
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tree = p["wheel"] / "pytriton" / "tritonserver"
    backends = run / "backends"
    shutil.rmtree(backends, ignore_errors=True)
    (backends / "onnxruntime").mkdir(parents=True)
    shutil.copytree(tree / "backends" / "python", backends / "python")
    shutil.copy2(tree / "python_backend_stubs" / p["version"] / "triton_python_backend_stub", backends / "python")
    shutil.copy2(Path(__file__).with_name("triton") / "onnxruntime_backend.py", backends / "onnxruntime" / "model.py")
    # the models' interpreter: a pip-less venv whose .pth lists this source tree, then the packages
    overlay = run / "python"
    if not (overlay / "bin" / "python3").exists():
        subprocess.run([str(p["python"]), "-m", "venv", "--without-pip", str(overlay)], check=True, capture_output=True)
    paths = [SOURCE_ROOT, *(site_packages if site_packages is not None else [_site_packages(p["env"], p["version"])])]
    (_site_packages(overlay, p["version"]) / "captioner-triton.pth").write_text("".join(f"{x}\n" for x in paths))
    ports = {k: (ports or {}).get(k) or _free_port() for k in ("http", "grpc", "metrics")}
    args = server_flags(str(repository), key, mode)
    local = [f"--backend-directory={backends}", "--exit-timeout-secs=10",
             *(f"--{k}-address={host}" for k in ports), *(f"--{k}-port={v}" for k, v in ports.items())]
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    environ.update(env or {})
    environ["PYTHONDONTWRITEBYTECODE"] = "1"  # the stubs import model.py from the repository: leave it unchanged
    environ["PATH"] = f"{overlay / 'bin'}{os.pathsep}{environ.get('PATH', '')}"
    environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(p["wheel"] / "nvidia_pytriton.libs"), str(p["libdir"]),
                                                               environ.get("LD_LIBRARY_PATH")]))
    log_path = run / "tritonserver.log"
    cmd = [str(tree / "bin" / "tritonserver"), *args, *local]
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=run, env=environ, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    log.info("tritonserver %s (pid %d) on %s: gRPC %d, HTTP %d, metrics %d; log %s", TRITON_SERVER_VERSION,
             proc.pid, host, ports["grpc"], ports["http"], ports["metrics"], log_path)
    s = TritonServer(proc, run, log_path, ports["http"], ports["grpc"], ports["metrics"], cmd, host)
    if wait:
        try:
            s.wait_ready(timeout)
        except Exception:
            s.stop()
            raise
    return s
