"""The data plane of `captioner serve`: one layer that every protocol front end hands off to
(KServe's server layout: `kserve/protocol/dataplane.py` behind its REST and gRPC servers).

The gRPC Servicer (captioner.serving.server.app) and the HTTP/REST app (captioner.serving.server.http) only decode
their wire format into `InputTensor`s and encode `InferResult`s back; validation against the
model configuration, running the model and the statistics behind the Prometheus metrics
(captioner.serving.server.metrics) happen here, once. Errors are `DataPlaneError(code, message)` with
Triton's error codes; each front end maps the code to its status (gRPC StatusCode; HTTP status
as Triton's src/http_server.cc `HttpCodeFromError`).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from captioner import __version__
from captioner.core.names import ENSEMBLE
from captioner.serving.errors import RequestError

# Triton error codes (TRITONSERVER_Error_Code) used here
INVALID_ARG, NOT_FOUND, UNAVAILABLE, INTERNAL, CANCELLED, DEADLINE = (
    "INVALID_ARG", "NOT_FOUND", "UNAVAILABLE", "INTERNAL", "CANCELLED", "DEADLINE_EXCEEDED")
# HTTP status per code: Triton src/http_server.cc HttpCodeFromError (INTERNAL->500, NOT_FOUND->404,
# UNAVAILABLE->503, INVALID_ARG/CANCELLED->400). A passed deadline is Triton's UNAVAILABLE
# "Request timeout expired" on HTTP, hence 503.
HTTP_STATUS = {INVALID_ARG: 400, NOT_FOUND: 404, UNAVAILABLE: 503, INTERNAL: 500, CANCELLED: 400, DEADLINE: 503}
# Failure reasons of nv_inference_request_failure{reason=...} (Triton docs/user_guide/metrics.md)
REASONS = {INVALID_ARG: "REJECTED", NOT_FOUND: "REJECTED", UNAVAILABLE: "REJECTED", CANCELLED: "CANCELED",
           DEADLINE: "CANCELED", INTERNAL: "BACKEND"}

DTYPES = {  # config enum name -> (protocol datatype, numpy dtype)
    "TYPE_FP32": ("FP32", np.float32), "TYPE_INT64": ("INT64", np.int64), "TYPE_INT32": ("INT32", np.int32),
    "TYPE_STRING": ("BYTES", np.object_), "TYPE_FP16": ("FP16", np.float16), "TYPE_BOOL": ("BOOL", np.bool_),
}
PLATFORM = {"onnxruntime": "onnxruntime_onnx", "python": "python"}


class DataPlaneError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


def dtype_of(t) -> tuple[str, type]:
    return DTYPES[mc.DataType.Name(t.data_type)]


@dataclass
class InputTensor:
    """One input as its wire delivered it: `raw` bytes (gRPC raw_input_contents, HTTP binary
    data) or `data`, a flat list of elements (gRPC typed contents, HTTP JSON)."""
    name: str
    datatype: str
    shape: list[int]
    raw: bytes | memoryview | None = None
    data: list | None = None


@dataclass
class InferResult:
    model: str
    version: str
    id: str
    outputs: list[tuple[str, str, np.ndarray]]  # (name, datatype, array)


@dataclass
class _Stats:  # Triton's per-model statistics behind its nv_inference_* metrics
    success: int = 0
    failure: dict = field(default_factory=dict)  # reason -> count
    inference_count: int = 0
    exec_count: int = 0
    request_us: int = 0
    queue_us: int = 0
    compute_us: int = 0


class BatchTimer:
    """Wraps a batcher function: records, on each batched item, when its batch started and
    how long it ran (queue time = start - submit; compute time = the batch's run time), and
    counts executions."""

    KEY = "__timing__"

    def __init__(self, fn):
        self.fn, self.executions = fn, 0

    def __call__(self, items: list[dict]):
        t0 = time.monotonic()
        self.executions += 1
        try:
            return self.fn(items)
        finally:
            t1 = time.monotonic()
            for it in items:
                tm = it.get(self.KEY)
                if tm is not None:
                    tm.update(start=t0, end=t1)


class DataPlane:
    """Health, metadata, configuration and inference over a `captioner.serving.server.app.Repository`."""

    def __init__(self, repo):
        self.repo = repo
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, str], _Stats] = {}

    # -- health and metadata
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def server_metadata(self) -> dict:
        return {"name": "captioner-local", "version": __version__,
                "extensions": ["classification", "model_configuration", "binary_tensor_data", "statistics"]}

    def version(self, name: str, version: str = "") -> int:
        from captioner.serving.server.app import NotFound

        try:
            return self.repo.version(name, parse_version(version))
        except NotFound as e:
            raise DataPlaneError(NOT_FOUND, f"{e} (loaded: {', '.join(sorted(self.repo.loaded)) or 'none'})") from None

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.version(name, version)
            return True
        except DataPlaneError:
            return False

    def config(self, name: str, version: str = "") -> mc.ModelConfig:
        self.version(name, version)
        from captioner.serving.triton_repo import autocomplete

        return autocomplete(self.repo.models[name].config)  # what tritonserver answers after loading

    def model_metadata(self, name: str, version: str = "") -> dict:
        cfg = self.config(name, version)
        batch = [-1] if cfg.max_batch_size > 0 else []

        def t(x):
            return {"name": x.name, "datatype": dtype_of(x)[0], "shape": batch + list(x.dims)}

        return {"name": cfg.name, "versions": [str(v) for v in self.repo.loaded[cfg.name]],
                "platform": cfg.platform or PLATFORM.get(cfg.backend, cfg.backend),
                "inputs": [t(x) for x in cfg.input], "outputs": [t(x) for x in cfg.output]}

    # -- inference
    def infer(self, name: str, version: str, inputs: list[InputTensor], outputs: list[str] | None = None,
              deadline=None, request_id: str = "") -> InferResult:
        """Validate `inputs` against the model's config, run it, return the requested outputs
        (all when `outputs` is empty). Every outcome is counted for the metrics."""
        from captioner.serving.server.app import Deadline, Expired, ShuttingDown

        t0 = time.monotonic()
        v = self.version(name, version)  # unknown model: not counted, as in Triton (no model to label)
        key = (name, str(v))
        timing: dict = {}
        try:
            cfg = self.repo.models[name].config
            check_outputs(cfg, outputs)  # an unknown output is refused before the model runs
            arrays = decode_inputs(cfg, inputs)
            for t in inputs:  # the wire buffers (an HTTP body's memoryviews) are released once decoded
                t.raw = t.data = None
            if name == ENSEMBLE:
                arrays[BatchTimer.KEY] = timing
            out = self.repo.run(name, arrays, v, deadline or Deadline())
            result = InferResult(name, version or "", request_id, select_outputs(cfg, out, outputs))
        except DataPlaneError as e:
            self._count(key, t0, error=e.code)
            raise
        except Expired as e:
            code = CANCELLED if str(e) == "cancelled" else DEADLINE
            self._count(key, t0, error=code)
            raise DataPlaneError(code, f"[{name}] {e}: request dropped") from None
        except ShuttingDown as e:
            self._count(key, t0, error=UNAVAILABLE)
            raise DataPlaneError(UNAVAILABLE, f"[{name}] {e}") from None
        except (RequestError, ValueError) as e:
            self._count(key, t0, error=INVALID_ARG)
            raise DataPlaneError(INVALID_ARG, f"[{name}] {e}") from None
        except Exception as e:  # noqa: BLE001 - a failure is this request's, never the server's
            import logging

            logging.getLogger(__name__).exception("model %s failed", name)
            self._count(key, t0, error=INTERNAL)
            raise DataPlaneError(INTERNAL, f"[{name}] {type(e).__name__}: {e}") from None
        rows = len(next(iter(a for k, a in arrays.items() if k != BatchTimer.KEY))) if cfg.max_batch_size > 0 else 1
        self._count(key, t0, rows=rows, timing=timing, t_submit=timing.get("submit"))
        return result

    def _count(self, key, t0: float, error: str | None = None, rows: int = 0, timing: dict | None = None,
               t_submit: float | None = None) -> None:
        t1 = time.monotonic()
        with self._lock:
            st = self._stats.setdefault(key, _Stats())
            st.request_us += int((t1 - t0) * 1e6)
            if error is not None:
                reason = REASONS[error]
                st.failure[reason] = st.failure.get(reason, 0) + 1
                return
            st.success += 1
            st.inference_count += rows
            if timing and "start" in timing:  # batched (ensemble): queue until its batch ran
                st.queue_us += int((timing["start"] - timing.get("submit", timing["start"])) * 1e6)
                st.compute_us += int((timing["end"] - timing["start"]) * 1e6)
            else:  # run directly: no queue
                st.exec_count += 1
                st.compute_us += int((t1 - t0) * 1e6)

    def stats(self) -> dict[tuple[str, str], _Stats]:
        """A copy of the per-(model, version) statistics; the ensemble's execution count is
        the number of dynamic batches it ran."""
        with self._lock:
            out = {k: _Stats(**{**vars(s), "failure": dict(s.failure)}) for k, s in self._stats.items()}
        timer = getattr(self.repo, "batch_timer", None)
        if timer is not None:
            for (n, _v), s in out.items():
                if n == ENSEMBLE:
                    s.exec_count = timer.executions
        return out


def parse_version(version: str) -> int:
    """A model version as a request names it: '' -> -1 (the latest loaded), else ASCII digits
    only. Triton's GetModelVersionFromString (server src/common.cc) refuses non-numbers and
    negatives with INVALID_ARG and this message; std::stol's leniency (leading blanks, a
    trailing tail) is not copied: " 1" or "1abc" is refused too."""
    if version == "":
        return -1
    if not (isinstance(version, str) and version.isascii() and version.isdigit() and len(version) <= 18):
        raise DataPlaneError(INVALID_ARG, f"failed to get model version from specified version string "
                                          f"{version!r}, version should be an integral value > 0")
    return int(version)


# The numbers each datatype holds: a JSON/typed element outside them is refused, never wrapped,
# truncated (3.7 -> 3) or converted from another kind (true -> 1).
_INT_RANGE = {"INT32": (-(1 << 31), (1 << 31) - 1), "INT64": (-(1 << 63), (1 << 63) - 1)}
_FLOAT_MAX = {"FP32": float(np.finfo(np.float32).max), "FP16": float(np.finfo(np.float16).max)}
MAX_DIM = 1 << 31  # any larger dimension is refused before its element count is computed


def _check_elements(name: str, dt: str, data: list) -> None:
    if dt in _INT_RANGE:
        lo, hi = _INT_RANGE[dt]
        for x in data:
            if type(x) is not int or not lo <= x <= hi:  # bool is an int subclass: refused by `type(...) is`
                raise RequestError(f"input '{name}': {dt} elements must be integers in [{lo}, {hi}], got {x!r}")
    elif dt in _FLOAT_MAX:
        m = _FLOAT_MAX[dt]
        for x in data:
            if type(x) not in (int, float) or not math.isfinite(x) or abs(x) > m:
                raise RequestError(f"input '{name}': {dt} elements must be finite numbers within +-{m:g}, got {x!r}")
    elif dt == "BOOL":
        for x in data:
            if type(x) is not bool:
                raise RequestError(f"input '{name}': BOOL elements must be true or false, got {x!r}")


def check_outputs(cfg: mc.ModelConfig, requested: list[str] | None) -> None:
    known = [o.name for o in cfg.output]
    for n in requested or []:
        if n not in known:
            raise RequestError(f"unknown output '{n}' requested (model outputs: {', '.join(known)})")


def decode_inputs(cfg: mc.ModelConfig, inputs: list[InputTensor]) -> dict[str, np.ndarray]:
    """Wire tensors -> arrays, checked against the config: names, datatypes, shapes, batch
    bounds, element counts (a BYTES payload's length prefixes are walked only up to the count
    its shape needs)."""
    from captioner.serving.server.app import bytes_elements

    spec = {t.name: t for t in cfg.input}
    batched = cfg.max_batch_size > 0
    got: dict[str, np.ndarray] = {}
    batch_sizes = set()
    for t in inputs:
        s = spec.get(t.name)
        if s is None:
            raise RequestError(f"unexpected input '{t.name}' (model inputs: {', '.join(spec)})")
        if t.name in got:
            raise RequestError(f"input '{t.name}' given twice")
        want_dt, np_dt = dtype_of(s)
        if t.datatype != want_dt:
            raise RequestError(f"input '{t.name}' has datatype {t.datatype}, expected {want_dt}")
        shape = [int(x) for x in t.shape]
        if any(not -MAX_DIM <= g <= MAX_DIM for g in shape):
            raise RequestError(f"input '{t.name}' has shape {shape}: a dimension is over {MAX_DIM}")
        dims = ([-1] if batched else []) + list(s.dims)
        if len(shape) != len(dims) or any(d != -1 and g != d for g, d in zip(shape, dims)):
            raise RequestError(f"input '{t.name}' has shape {shape}, expected {dims} (-1 = any)")
        if any(g < 0 for g in shape):
            raise RequestError(f"input '{t.name}' has a negative dimension in {shape}")
        if batched:
            if not 1 <= shape[0] <= cfg.max_batch_size:
                raise RequestError(f"input '{t.name}' batch size {shape[0]} is outside 1..{cfg.max_batch_size}")
            batch_sizes.add(shape[0])
        n = math.prod(shape)
        if t.raw is not None:
            if want_dt == "BYTES":
                arr = bytes_elements(t.raw, n, t.name)
            else:
                if len(t.raw) != n * np.dtype(np_dt).itemsize:
                    raise RequestError(f"input '{t.name}' has {len(t.raw)} bytes, shape {shape} of {want_dt} "
                                       f"needs {n * np.dtype(np_dt).itemsize}")
                # bytes(): a view into an HTTP body would keep the whole body alive (no copy for gRPC bytes)
                arr = np.frombuffer(bytes(t.raw), dtype=np_dt)
        elif t.data is not None:
            if len(t.data) != n:
                raise RequestError(f"input '{t.name}' holds {len(t.data)} elements, shape {shape} needs {n}")
            if want_dt == "BYTES":
                if not all(isinstance(x, (bytes, str)) for x in t.data):
                    raise RequestError(f"input '{t.name}': BYTES elements must be strings")
                arr = np.empty(n, dtype=np.object_)
                arr[:] = [x.encode() if isinstance(x, str) else x for x in t.data]
            else:
                _check_elements(t.name, want_dt, t.data)
                arr = np.asarray(t.data, dtype=np_dt)
        else:
            raise RequestError(f"input '{t.name}' has no data")
        got[t.name] = arr.reshape(shape)
    missing = [n for n, s in spec.items() if not s.optional and n not in got]
    if missing:
        raise RequestError(f"missing required input(s): {', '.join(missing)}")
    if len(batch_sizes) > 1:
        raise RequestError(f"inputs disagree on batch size: {sorted(batch_sizes)}")
    return got


def select_outputs(cfg: mc.ModelConfig, outputs: dict[str, np.ndarray],
                   requested: list[str] | None) -> list[tuple[str, str, np.ndarray]]:
    known = {o.name: o for o in cfg.output}
    names = list(requested or []) or [o.name for o in cfg.output]
    res = []
    for n in names:
        if n not in known:
            raise RequestError(f"unknown output '{n}' requested (model outputs: {', '.join(known)})")
        res.append((n, dtype_of(known[n])[0], outputs[n]))
    return res
