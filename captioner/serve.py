"""`captioner serve`: a local gRPC server speaking Triton's protocol (KServe v2, built on
`tritonclient.grpc.service_pb2_grpc`) over an exported model repository.

It serves the same model names, tensors and ModelConfig answers as Triton would for the
repository, running the ONNX models in onnxruntime and the Python-backend logic in process
(the same `captioner.serving_core` functions), so client code is identical against both.
Concurrent requests to a batching model are batched up to its `max_batch_size` within its
dynamic-batching queue delay. Bad requests get INVALID_ARGUMENT / NOT_FOUND naming the
problem; the server keeps serving.
"""
from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from captioner import __version__
from captioner.export import read_config
from captioner.names import (BEAM_SIZE, CAPTION, CROSS_KV, DECODE_LOOP, DECODER, ENCODER, ENCODER_HIDDEN, ENSEMBLE,
                             IMAGE, INPUT_IDS, LOGITS, MAX_TOKENS, PAST_KV, PIXEL_VALUES, PREPROCESS, PRESENT_KV)
from captioner.onnx_runtime import OrtCaptioner
from captioner.serving_core import RequestError, image_bytes_to_pixels, params_for

log = logging.getLogger(__name__)

DTYPES = {  # config enum name -> (protocol datatype, numpy dtype)
    "TYPE_FP32": ("FP32", np.float32), "TYPE_INT64": ("INT64", np.int64), "TYPE_INT32": ("INT32", np.int32),
    "TYPE_STRING": ("BYTES", np.object_), "TYPE_FP16": ("FP16", np.float16), "TYPE_BOOL": ("BOOL", np.bool_),
}
PLATFORM = {"onnxruntime": "onnxruntime_onnx", "python": "python"}


class NotFound(Exception):
    pass


def _dtype(t) -> tuple[str, type]:
    return DTYPES[mc.DataType.Name(t.data_type)]


class Batcher:
    """Collects concurrent requests for up to `delay_s` or until `max_batch` rows, then runs
    `fn(items) -> results` once for all of them (a result may be an Exception)."""

    def __init__(self, fn, max_batch: int, delay_s: float, name: str):
        self.fn, self.max_batch, self.delay = fn, max(1, max_batch), delay_s
        self.q: queue.Queue = queue.Queue()
        self.batches = 0
        self.thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self.thread.start()

    def submit(self, item, rows: int) -> futures.Future:
        f: futures.Future = futures.Future()
        self.q.put((item, rows, f))
        return f

    def stop(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            first = self.q.get()
            if first is None:
                return
            batch, rows = [first], first[1]
            deadline = time.monotonic() + self.delay
            while rows < self.max_batch:
                try:
                    nxt = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.q.put(None)
                    break
                if rows + nxt[1] > self.max_batch:
                    self.q.put(nxt)  # next batch; order among waiting requests is kept loosely
                    break
                batch.append(nxt)
                rows += nxt[1]
            self.batches += 1
            try:
                results = self.fn([b[0] for b in batch])
            except Exception as e:  # noqa: BLE001
                results = [e] * len(batch)
            for (_, _, f), r in zip(batch, results):
                if isinstance(r, Exception):
                    f.set_exception(r)
                else:
                    f.set_result(r)


class Repository:
    """The models of an exported repository, runnable in process."""

    def __init__(self, repo: str | Path, threads: int = 0):
        self.path = Path(repo)
        self.configs: dict[str, mc.ModelConfig] = {}
        for cfg_path in sorted(self.path.glob("*/config.pbtxt")):
            cfg = read_config(cfg_path)
            if cfg.name != cfg_path.parent.name:
                raise ValueError(f"{cfg_path}: name '{cfg.name}' does not match its folder")
            self.configs[cfg.name] = cfg
        missing = {ENSEMBLE, PREPROCESS, ENCODER, DECODER, DECODE_LOOP} - set(self.configs)
        if missing:
            raise FileNotFoundError(f"{self.path} is not a complete captioner repository: missing {sorted(missing)}")
        self.ort = OrtCaptioner(self.path, threads)
        ens = self.configs[ENSEMBLE]
        delay = ens.dynamic_batching.max_queue_delay_microseconds / 1e6 if ens.HasField("dynamic_batching") else 0.002
        self.batcher = Batcher(self._ensemble_batch, ens.max_batch_size, max(delay, 0.002), ENSEMBLE)
        self.lock = threading.Lock()
        self.stats: dict[str, dict] = {}

    # -- model runners: inputs dict name -> np.ndarray (with batch dim) -> outputs dict
    def run(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._run(model, inputs)
        with self.lock:  # Triton's meaning: inferences = batch items, executions = model runs
            st = self.stats.setdefault(model, {"inference_count": 0, "execution_count": 0, "last_inference": 0})
            st["inference_count"] += len(next(iter(inputs.values()))) if inputs else 0
            st["last_inference"] = int(time.time() * 1000)
            if model != ENSEMBLE:
                st["execution_count"] += 1
        return out

    def _run(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if model == ENSEMBLE:
            return self.batcher.submit(inputs, len(inputs[IMAGE])).result()
        if model == PREPROCESS:
            return {PIXEL_VALUES: image_bytes_to_pixels(inputs[IMAGE], self.ort.pre)}
        if model == ENCODER:
            hidden, cross = self.ort.run_encoder(inputs[PIXEL_VALUES])
            return {ENCODER_HIDDEN: hidden, CROSS_KV: cross}
        if model == DECODER:
            logits, present = self.ort.run_decoder(inputs[INPUT_IDS], inputs[CROSS_KV], inputs[PAST_KV])
            return {LOGITS: logits, PRESENT_KV: present}
        if model == DECODE_LOOP:
            self.ort.loop.check_cross_kv(inputs[CROSS_KV])
            p = params_for(_opt(inputs, BEAM_SIZE), _opt(inputs, MAX_TOKENS), self.ort.loop.s)
            res = self.ort.loop.caption_requests([(inputs[CROSS_KV], p)])[0]
            if isinstance(res, Exception):
                raise res
            return {CAPTION: _captions(res)}
        raise NotFound(model)

    def _ensemble_batch(self, items: list[dict]) -> list:
        """preprocess -> encoder -> decode_loop for many requests at once; a request whose
        image is bad fails alone."""
        out: list = [None] * len(items)
        ok, pixels, params = [], [], []
        for i, inp in enumerate(items):
            try:
                p = params_for(_opt(inp, BEAM_SIZE), _opt(inp, MAX_TOKENS), self.ort.loop.s)
                pixels.append(image_bytes_to_pixels(inp[IMAGE], self.ort.pre))
                ok.append(i)
                params.append(p)
            except Exception as e:  # noqa: BLE001
                out[i] = e
        if ok:
            _, cross = self.ort.run_encoder(np.concatenate(pixels))
            sizes = np.cumsum([0] + [len(x) for x in pixels])
            res = self.ort.loop.caption_requests([(cross[a:b], p) for a, b, p in zip(sizes[:-1], sizes[1:], params)])
            for i, r in zip(ok, res):
                out[i] = r if isinstance(r, Exception) else {CAPTION: _captions(r)}
        return out

    def close(self) -> None:
        self.batcher.stop()


def _opt(inputs: dict, name: str):
    a = inputs.get(name)
    if a is None or a.size == 0:
        return None
    vals = set(a.reshape(-1).tolist())
    if len(vals) > 1:
        raise RequestError(f"{name} must be the same for every image of a request, got {sorted(vals)}")
    return vals.pop()


def _captions(caps: list[str]) -> np.ndarray:
    return np.array([c.encode() for c in caps], dtype=np.object_).reshape(-1, 1)


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repo: Repository):
        self.repo = repo
        self.requests = 0
        self.errors = 0

    # -- health and metadata
    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name="captioner-local", version=__version__,
                                                  extensions=["classification", "model_configuration"])

    def _config(self, name: str, version: str, context) -> mc.ModelConfig:
        cfg = self.repo.configs.get(name)
        if cfg is None or version not in ("", "1"):
            what = f"model '{name}'" + (f" version {version}" if version else "")
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"Request for unknown model: {what} is not found (serving: {', '.join(sorted(self.repo.configs))})")
        return cfg

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=request.name in self.repo.configs and request.version in ("", "1"))

    def ModelMetadata(self, request, context):
        cfg = self._config(request.name, request.version, context)
        batch = [-1] if cfg.max_batch_size > 0 else []
        T = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=cfg.name, versions=["1"], platform=cfg.platform or PLATFORM.get(cfg.backend, cfg.backend),
            inputs=[T(name=t.name, datatype=_dtype(t)[0], shape=batch + list(t.dims)) for t in cfg.input],
            outputs=[T(name=t.name, datatype=_dtype(t)[0], shape=batch + list(t.dims)) for t in cfg.output])

    def ModelConfig(self, request, context):
        return service_pb2.ModelConfigResponse(config=self._config(request.name, request.version, context))

    def ModelStatistics(self, request, context):
        names = [request.name] if request.name else sorted(self.repo.configs)
        if request.name:
            self._config(request.name, request.version, context)
        out = []
        for n in names:
            st = dict(self.repo.stats.get(n, {}))
            if n == ENSEMBLE:
                st["execution_count"] = self.repo.batcher.batches  # one batched pass per dynamic batch
            out.append(service_pb2.ModelStatistics(name=n, version="1", **st))
        return service_pb2.ModelStatisticsResponse(model_stats=out)

    def RepositoryIndex(self, request, context):
        M = service_pb2.RepositoryIndexResponse.ModelIndex
        return service_pb2.RepositoryIndexResponse(
            models=[M(name=n, version="1", state="READY") for n in sorted(self.repo.configs)])

    # -- inference
    def ModelInfer(self, request, context):
        self.requests += 1
        cfg = self._config(request.model_name, request.model_version, context)
        try:
            inputs = self._parse_inputs(cfg, request)
            outputs = self.repo.run(cfg.name, inputs)
            return self._response(cfg, request, outputs)
        except (RequestError, ValueError) as e:
            self.errors += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"[{cfg.name}] {e}")
        except Exception as e:  # noqa: BLE001 - a failure is this request's, never the server's
            self.errors += 1
            log.exception("model %s failed", cfg.name)
            context.abort(grpc.StatusCode.INTERNAL, f"[{cfg.name}] {type(e).__name__}: {e}")

    def _parse_inputs(self, cfg: mc.ModelConfig, request) -> dict[str, np.ndarray]:
        spec = {t.name: t for t in cfg.input}
        batched = cfg.max_batch_size > 0
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise RequestError(f"{len(request.inputs)} inputs but {len(raw)} raw input contents")
        got: dict[str, np.ndarray] = {}
        batch_sizes = set()
        for i, t in enumerate(request.inputs):
            s = spec.get(t.name)
            if s is None:
                raise RequestError(f"unexpected input '{t.name}' (model inputs: {', '.join(spec)})")
            want_dt, np_dt = _dtype(s)
            if t.datatype != want_dt:
                raise RequestError(f"input '{t.name}' has datatype {t.datatype}, expected {want_dt}")
            shape = list(t.shape)
            dims = ([-1] if batched else []) + list(s.dims)
            if len(shape) != len(dims) or any(d != -1 and g != d for g, d in zip(shape, dims)):
                raise RequestError(f"input '{t.name}' has shape {shape}, expected {dims} (-1 = any)")
            if any(g < 0 for g in shape):
                raise RequestError(f"input '{t.name}' has a negative dimension in {shape}")
            if batched:
                if not 1 <= shape[0] <= cfg.max_batch_size:
                    raise RequestError(f"input '{t.name}' batch size {shape[0]} is outside 1..{cfg.max_batch_size}")
                batch_sizes.add(shape[0])
            n = int(np.prod(shape))
            if want_dt == "BYTES":
                arr = deserialize_bytes_tensor(raw[i]) if raw else np.array(list(t.contents.bytes_contents), np.object_)
                if arr.size != n:
                    raise RequestError(f"input '{t.name}' holds {arr.size} elements, shape {shape} needs {n}")
                arr = arr.reshape(shape)
            else:
                buf = raw[i] if raw else None
                if buf is None:
                    raise RequestError(f"input '{t.name}' has no raw contents")
                if len(buf) != n * np.dtype(np_dt).itemsize:
                    raise RequestError(f"input '{t.name}' has {len(buf)} bytes, shape {shape} of {want_dt} needs "
                                       f"{n * np.dtype(np_dt).itemsize}")
                arr = np.frombuffer(buf, dtype=np_dt).reshape(shape)
            got[t.name] = arr
        missing = [n for n, s in spec.items() if not s.optional and n not in got]
        if missing:
            raise RequestError(f"missing required input(s): {', '.join(missing)}")
        if len(batch_sizes) > 1:
            raise RequestError(f"inputs disagree on batch size: {sorted(batch_sizes)}")
        return got

    def _response(self, cfg, request, outputs: dict[str, np.ndarray]):
        names = [o.name for o in request.outputs] or [o.name for o in cfg.output]
        known = {o.name: o for o in cfg.output}
        resp = service_pb2.ModelInferResponse(model_name=cfg.name, model_version="1", id=request.id)
        for n in names:
            if n not in known:
                raise RequestError(f"unknown output '{n}' requested (model outputs: {', '.join(known)})")
            arr = outputs[n]
            dt = _dtype(known[n])[0]
            resp.outputs.add(name=n, datatype=dt, shape=list(arr.shape))
            if dt == "BYTES":
                resp.raw_output_contents.append(serialize_byte_tensor(arr).item())
            else:
                resp.raw_output_contents.append(np.ascontiguousarray(arr).tobytes())
        return resp


MAX_MESSAGE = 256 * 1024 * 1024


def start_server(repo: str | Path, host: str = "127.0.0.1", port: int = 8001, workers: int = 32,
                 threads: int = 0) -> tuple[grpc.Server, Repository, int]:
    r = Repository(repo, threads)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                  ("grpc.max_send_message_length", MAX_MESSAGE)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(r), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    server.start()
    return server, r, bound


def serve_forever(repo: str | Path, host: str = "127.0.0.1", port: int = 8001, threads: int = 0) -> None:
    server, r, bound = start_server(repo, host, port, threads=threads)
    log.info("serving %s on %s:%d (models: %s)", repo, host, bound, ", ".join(sorted(r.configs)))
    stop = threading.Event()

    def _term(signum, _frame):
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    stop.wait()
    server.stop(grace=5).wait()
    r.close()
    log.info("server stopped cleanly")
