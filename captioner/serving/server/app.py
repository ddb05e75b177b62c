"""`captioner serve`: a local gRPC server speaking Triton's protocol (KServe v2, built on
`tritonclient.grpc.service_pb2_grpc`) over an exported model repository.

It serves the same model names, tensors and ModelConfig answers as Triton would for the
repository, running the ONNX models in onnxruntime and the Python-backend logic in process
(the same `captioner.serving.core` functions), so client code is identical against both.
Concurrent requests to a batching model are batched up to its `max_batch_size` within its
dynamic-batching queue delay. Bad requests get INVALID_ARGUMENT / NOT_FOUND naming the
problem; the server keeps serving.

Hostile requests are bounded (issue 10): images are decoded in a bounded pool outside the
batcher (a light lane and a heavy lane, so a request of large images cannot hold up a small
one), each request has a pixel budget, BYTES tensors are counted while their length prefixes
are walked, messages and concurrent RPCs are capped, and work for a client that has gone
(deadline passed, cancelled) is dropped before decoding and before the encoder.
"""
from __future__ import annotations

import logging
import queue
import signal
import socket
import struct
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Iterable

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from captioner.serving import triton_repo
from captioner.serving.server.dataplane import (CANCELLED, DEADLINE, INTERNAL, INVALID_ARG, NOT_FOUND, UNAVAILABLE, BatchTimer,
                                 DataPlane, DataPlaneError, InputTensor)
from captioner.core.deployment import GRPC_RESTRICTED_HEADER_PREFIX
from captioner.core.names import (BEAM_SIZE, CROSS_KV, DECODE_LOOP, DECODER, ENCODER, ENCODER_HIDDEN, ENSEMBLE, IMAGE,
                             INPUT_IDS, LOGITS, MAX_TOKENS, PAST_KV, PIXEL_VALUES, PREPROCESS, PRESENT_KV)
from captioner.serving.onnx_runtime import session
from captioner.core.preprocess import SERVING_MAX_PIXELS
from captioner.core.limits import (HEAVY_DECODERS, LIGHT_DECODERS, LIGHT_REQUEST_PIXELS, MAX_CONCURRENT_RPCS,
                                   MAX_RECEIVE_MESSAGE, MAX_SEND_MESSAGE, REQUEST_PIXEL_BUDGET)
from captioner.serving.core import (DecodeLoop, caption_requests, check_pixel_budget, image_bytes_to_pixels,
                                    load_preprocess, params_for, request_int)
from captioner.serving.errors import RequestError

log = logging.getLogger(__name__)

# gRPC status per data-plane error code (Triton's src/grpc/grpc_utils.cc TritonCodeToGrpcCode)
GRPC_STATUS = {INVALID_ARG: grpc.StatusCode.INVALID_ARGUMENT, NOT_FOUND: grpc.StatusCode.NOT_FOUND,
               UNAVAILABLE: grpc.StatusCode.UNAVAILABLE, INTERNAL: grpc.StatusCode.INTERNAL,
               CANCELLED: grpc.StatusCode.CANCELLED, DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED}


class NotFound(Exception):
    pass


class Expired(Exception):
    """The client has gone (deadline passed or cancelled); its remaining work is dropped."""


class BindError(OSError):
    """The gRPC port cannot be listened on (message names host, port and the reason)."""


class ShuttingDown(Exception):
    """The server is stopping; the request was not run."""


class Deadline:
    """When a request's client stops waiting: its gRPC deadline (monotonic seconds, None = none)
    and, given the RPC context, its cancellation."""

    def __init__(self, at: float | None = None, context=None):
        self.at, self.context = at, context

    @classmethod
    def of(cls, context) -> "Deadline":
        rem = context.time_remaining()
        # grpc reports a huge remainder for calls without a deadline
        return cls(None if rem is None or rem > 1e8 else time.monotonic() + rem, context)

    def expired(self) -> str | None:
        """Why the client is gone, or None while it waits."""
        if self.at is not None and time.monotonic() >= self.at:
            return "deadline exceeded"
        if self.context is not None and not self.context.is_active():
            return "cancelled"
        return None

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def wait(self, f: futures.Future):
        """The future's result, or Expired once the client has stopped waiting."""
        try:
            return f.result(timeout=self.remaining())
        except futures.TimeoutError:
            raise Expired("deadline exceeded") from None


def _settle(f: futures.Future, r) -> None:
    if f.done():
        return
    try:
        f.set_exception(r) if isinstance(r, BaseException) else f.set_result(r)
    except futures.InvalidStateError:
        pass  # settled concurrently (stop() failing what the loop also finished)


class DecodePool:
    """Decodes requests' images outside the batcher thread in two fixed pools: requests of up to
    `light_pixels` in total in the light lane, larger ones (within the request budget) in the heavy
    lane. A request is refused over its pixel budget before anything is decoded; a request whose
    client has gone is not decoded (checked before each image)."""

    def __init__(self, max_pixels: int = SERVING_MAX_PIXELS, budget: int = REQUEST_PIXEL_BUDGET,
                 light_pixels: int = LIGHT_REQUEST_PIXELS):
        self.max_pixels, self.budget, self.light_pixels = max_pixels, budget, light_pixels
        self.light = futures.ThreadPoolExecutor(LIGHT_DECODERS, thread_name_prefix="decode-light")
        self.heavy = futures.ThreadPoolExecutor(HEAVY_DECODERS, thread_name_prefix="decode-heavy")
        self.lock = threading.Lock()
        self.skipped_images = 0

    def pixels(self, images: np.ndarray, pre, deadline: Deadline) -> np.ndarray:
        """`pre`: the preprocessing settings of the preprocess model version that runs."""
        total = check_pixel_budget(images, self.budget, self.max_pixels)
        lane = self.light if total <= self.light_pixels else self.heavy
        try:
            f = lane.submit(self._decode, images, pre, deadline)
        except RuntimeError:  # the pool was shut down
            raise ShuttingDown("server is shutting down: request not run") from None
        return deadline.wait(f)

    def _decode(self, images: np.ndarray, pre, deadline: Deadline) -> np.ndarray:
        n = images.size

        def check(i: int) -> None:
            why = deadline.expired()
            if why:
                with self.lock:
                    self.skipped_images += n - i
                log.info("skipped decoding %d of %d image(s) of a request: %s", n - i, n, why)
                raise Expired(why)

        return image_bytes_to_pixels(images, pre, self.max_pixels, check)

    def close(self) -> None:
        for pool in (self.light, self.heavy):
            pool.shutdown(wait=False, cancel_futures=True)


def bytes_elements(buf: bytes | memoryview, n: int, name: str) -> np.ndarray:
    """A raw BYTES tensor (each element a 4-byte little-endian length, then its bytes; KServe v2
    / Triton `raw_input_contents`) -> object array of n elements. The prefixes are walked and the
    walk stops at the first element beyond n, so a payload of millions of elements costs nothing;
    a prefix that is cut short or runs past the end is INVALID_ARGUMENT naming the element."""
    out: list[bytes] = []
    off, end = 0, len(buf)
    while off < end:
        if len(out) == n:
            raise RequestError(f"input '{name}' holds more than {n} element(s), its shape needs {n}")
        if off + 4 > end:
            raise RequestError(f"input '{name}' element {len(out)}: BYTES length prefix cut short at byte "
                               f"{off} of {end}")
        (k,) = struct.unpack_from("<I", buf, off)
        off += 4
        if k > end - off:
            raise RequestError(f"input '{name}' element {len(out)}: BYTES length prefix declares {k} bytes but "
                               f"only {end - off} follow")
        out.append(bytes(buf[off:off + k]))  # a bytes copy also when `buf` is a memoryview of an HTTP body
        off += k
    if len(out) != n:
        raise RequestError(f"input '{name}' holds {len(out)} elements, its shape needs {n}")
    arr = np.empty(n, dtype=np.object_)
    arr[:] = out
    return arr


class Batcher:
    """Collects concurrent requests for up to `delay_s` or until `max_batch` rows, then runs
    `fn(items) -> results` once for all of them (a result may be an Exception). Items whose
    client has gone are dropped before `fn` runs. `stop()` runs what was queued before it and
    fails anything still pending; nothing submitted after it is left waiting."""

    def __init__(self, fn, max_batch: int, delay_s: float, name: str):
        self.fn, self.max_batch, self.delay = fn, max(1, max_batch), delay_s
        self.q: queue.Queue = queue.Queue()
        self.batches = 0
        self.dropped = 0
        self._held = None  # an item that did not fit the last batch: first in the next one
        self._lock = threading.Lock()
        self._stopped = False
        self.thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self.thread.start()

    def submit(self, item, rows: int, deadline: Deadline | None = None) -> futures.Future:
        f: futures.Future = futures.Future()
        with self._lock:  # the stop signal is queued under the same lock: nothing lands behind it
            if self._stopped:
                f.set_exception(ShuttingDown("server is shutting down: request not run"))
                return f
            self.q.put((item, rows, f, deadline))
        return f

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self.q.put(None)
        self.thread.join(timeout=timeout)
        self._fail_pending()  # only if the loop could not finish in time

    def _fail_pending(self) -> None:
        pending = [self._held] if self._held is not None else []
        while True:
            try:
                pending.append(self.q.get_nowait())
            except queue.Empty:
                break
        for x in pending:
            if x is not None:
                _settle(x[2], ShuttingDown("server is shutting down: request not run"))

    def _loop(self) -> None:
        stopping = False
        while True:
            if self._held is not None:
                first, self._held = self._held, None
            elif stopping:
                return  # the stop signal was the last item queued
            else:
                first = self.q.get()
                if first is None:
                    return
            batch, rows = [first], first[1]
            deadline = time.monotonic() + self.delay
            while rows < self.max_batch and not stopping:
                try:
                    nxt = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                elif rows + nxt[1] > self.max_batch:
                    self._held = nxt  # kept here, never re-queued behind a stop signal
                    break
                else:
                    batch.append(nxt)
                    rows += nxt[1]
            self._run(batch)

    def _run(self, batch: list) -> None:
        live = []
        for b in batch:
            why = b[3].expired() if b[3] is not None else None
            if why:
                _settle(b[2], Expired(why))
            else:
                live.append(b)
        if len(live) < len(batch):
            self.dropped += len(batch) - len(live)
            log.info("dropped %d request(s) before the encoder: client gone", len(batch) - len(live))
        if not live:
            return
        self.batches += 1
        try:
            results = self.fn([b[0] for b in live])
        except Exception as e:  # noqa: BLE001
            results = [e] * len(live)
        for b, r in zip(live, results):
            _settle(b[2], r)


class Repository:
    """The models of an exported repository that Triton would load, runnable in process.

    Loading follows `captioner.serving.triton_repo` (Triton's rules, from the object listing):
    model-control mode "none" loads every model and refuses to start if Triton would refuse
    one (Triton's default --exit-on-error); "explicit" loads only what `load()` names plus
    ensemble steps. The decode loop runs its own in-process decoder session (the graph in
    its version folder), as Triton's decode_loop model does: no call to the `decoder` model."""

    def __init__(self, repo: str | Path, threads: int = 0, control: str = "none", load: Iterable[str] = ()):
        self.path = Path(repo)
        self.threads = threads
        self.control = control
        self.decode_pool = DecodePool()
        self.lock = threading.Lock()
        self.stats: dict[str, dict] = {}
        self.models: dict[str, triton_repo.Model] = {}
        self.loaded: dict[str, list[int]] = {}
        self.unloaded: dict[str, list[int]] = {}  # versions of models unloaded through the control API
        self._cache: dict[tuple[str, int], object] = {}
        self.batcher: Batcher | None = None
        self.batch_timer: BatchTimer | None = None  # the ensemble's batches: queue/compute time, executions
        if not self.path.is_dir():
            raise triton_repo.RepositoryError(f"failed to stat file {self.path}: the model repository does not exist")
        if control == "none":
            keys, read = triton_repo.listing_from_dir(self.path)
            self.load(sorted(triton_repo.load_listing(keys, read)), bls_check=True)
        elif control == "explicit":
            for name in load:
                self.load([name])
        else:
            raise ValueError(f"model control mode must be 'none' or 'explicit', got {control!r}")

    @property
    def configs(self) -> dict[str, mc.ModelConfig]:
        return {n: self.models[n].config for n in self.loaded}

    # -- model control (Triton re-reads the repository on every load)
    def load(self, names: list[str], bls_check: bool = False) -> list[str]:
        keys, read = triton_repo.listing_from_dir(self.path)
        models = triton_repo.load_listing(keys, read)
        with self.lock:
            order = triton_repo.plan_load(models, names, read, bls=bls_check)
            for n in order:  # build every runner before switching, so a failed load changes nothing
                for v in models[n].selected:
                    self._runner(n, v, models, fresh=True)
            self.models.update({n: models[n] for n in order})
            for n in order:
                self.loaded[n] = models[n].selected
                self.unloaded.pop(n, None)
            if ENSEMBLE in order:
                ens = models[ENSEMBLE].config
                delay = ens.dynamic_batching.max_queue_delay_microseconds / 1e6 \
                    if ens.HasField("dynamic_batching") else 0.002
                self.batch_timer = BatchTimer(self._ensemble_batch)
                old, self.batcher = self.batcher, Batcher(self.batch_timer, ens.max_batch_size, max(delay, 0.002),
                                                          ENSEMBLE)
                if old is not None:
                    old.stop()
        log.info("loaded %s", ", ".join(f"{n} (versions {self.loaded[n]})" for n in order))
        return order

    def unload(self, name: str) -> None:
        with self.lock:
            if name not in self.loaded:
                raise NotFound(name)
            self.unloaded[name] = self.loaded.pop(name)
            if name == ENSEMBLE and self.batcher is not None:
                self.batcher.stop()
                self.batcher = None
        log.info("unloaded %s", name)

    def version(self, model: str, version: int = -1) -> int:
        """The loaded version that serves a request for `version` (-1: the latest loaded),
        or NotFound with Triton's message."""
        vs = self.loaded.get(model)
        if not vs or (version != -1 and version not in vs):
            what = f"'{model}'" + (f" version {version}" if version != -1 else "")
            raise NotFound(f"Request for unknown model: {what} is not found")
        return max(vs) if version == -1 else version

    def _runner(self, model: str, v: int, models=None, fresh: bool = False):
        key = (model, v)
        if key in self._cache and not fresh:
            return self._cache[key]
        d = self.path / model / str(v)
        if model in (ENCODER, DECODER):
            r = session(d / "model.onnx", self.threads)
        elif model == PREPROCESS:
            r = load_preprocess(d)
        elif model == DECODE_LOOP:
            r = DecodeLoop.in_process(d, self.threads)  # its own decoder session, as in Triton
        else:
            r = None
        self._cache[key] = r
        return r

    def _steps(self) -> dict[str, int]:
        """The versions the loaded ensemble runs (its pinned step versions, else the latest)."""
        return {st.model_name: self.version(st.model_name, st.model_version)
                for st in self.models[ENSEMBLE].config.ensemble_scheduling.step}

    # -- model runners: inputs dict name -> np.ndarray (with batch dim) -> outputs dict
    def run(self, model: str, inputs: dict[str, np.ndarray], version: int = -1,
            deadline: Deadline | None = None) -> dict[str, np.ndarray]:
        v = self.version(model, version)
        out = self._run(model, v, inputs, deadline or Deadline())
        self._tally(model, len(next(iter(inputs.values()))) if inputs else 0, 0 if model == ENSEMBLE else 1)
        return out

    def _tally(self, model: str, rows: int, executions: int) -> None:
        """Triton's statistics: inferences = batch items, executions = model runs, counted for
        each model that ran, the ensemble's steps included (core src/ensemble_scheduler counts
        every composing model's requests in that model's own statistics)."""
        with self.lock:
            st = self.stats.setdefault(model, {"inference_count": 0, "execution_count": 0, "last_inference": 0})
            st["inference_count"] += rows
            st["execution_count"] += executions
            st["last_inference"] = int(time.time() * 1000)

    def _run(self, model: str, v: int, inputs: dict[str, np.ndarray], deadline: Deadline) -> dict[str, np.ndarray]:
        if model == ENSEMBLE:
            steps = self._steps()
            loop = self._runner(DECODE_LOOP, steps[DECODE_LOOP])
            params_for(request_int(inputs, BEAM_SIZE), request_int(inputs, MAX_TOKENS), loop.s)  # refuse before decoding
            pixels = self.decode_pool.pixels(inputs[IMAGE], self._runner(PREPROCESS, steps[PREPROCESS]), deadline)
            self._tally(PREPROCESS, len(pixels), 1)  # one preprocess execution per request
            batcher = self.batcher
            if batcher is None:
                raise NotFound(f"Request for unknown model: '{ENSEMBLE}' is not found")
            if BatchTimer.KEY in inputs:  # the data plane's timing record: queued from here
                inputs[BatchTimer.KEY]["submit"] = time.monotonic()
            return deadline.wait(batcher.submit({**inputs, PIXEL_VALUES: pixels}, len(pixels), deadline))
        r = self._runner(model, v)
        if model == PREPROCESS:
            return {PIXEL_VALUES: self.decode_pool.pixels(inputs[IMAGE], r, deadline)}
        if model == ENCODER:
            hidden, cross = r.run([ENCODER_HIDDEN, CROSS_KV], {PIXEL_VALUES: inputs[PIXEL_VALUES].astype(np.float32)})
            return {ENCODER_HIDDEN: hidden, CROSS_KV: cross}
        if model == DECODER:
            return dict(zip([LOGITS, PRESENT_KV], r.run([LOGITS, PRESENT_KV], {
                INPUT_IDS: inputs[INPUT_IDS], CROSS_KV: inputs[CROSS_KV], PAST_KV: inputs[PAST_KV]})))
        if model == DECODE_LOOP:
            res = caption_requests(r, [inputs])[0]
            if isinstance(res, Exception):
                raise res
            return res
        raise NotFound(model)

    def _ensemble_batch(self, items: list[dict]) -> list:
        """encoder -> decode_loop for many requests at once (their images were decoded by the
        decode pool into PIXEL_VALUES); a request that fails fails alone. The decode-loop step is
        serving_core.caption_requests, as in Triton."""
        steps = self._steps()
        enc, loop = self._runner(ENCODER, steps[ENCODER]), self._runner(DECODE_LOOP, steps[DECODE_LOOP])
        pixels = [inp[PIXEL_VALUES] for inp in items]
        _, cross = enc.run([ENCODER_HIDDEN, CROSS_KV], {PIXEL_VALUES: np.concatenate(pixels)})
        sizes = np.cumsum([0] + [len(x) for x in pixels])
        for step in (ENCODER, DECODE_LOOP):  # each runs once over the whole dynamic batch
            self._tally(step, int(sizes[-1]), 1)
        return caption_requests(loop, [{CROSS_KV: cross[a:b], **{k: inp[k] for k in (BEAM_SIZE, MAX_TOKENS) if k in inp}}
                                       for inp, a, b in zip(items, sizes[:-1], sizes[1:])])

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        self.decode_pool.close()


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """gRPC wire decoding only: every inference, health, metadata and config RPC hands off to
    the DataPlane (the same calls the HTTP/REST front end makes)."""

    def __init__(self, repo: Repository, restricted: tuple[str, str] | None = None, plane: DataPlane | None = None):
        self.repo = repo
        self.plane = plane or DataPlane(repo)
        self.restricted = restricted  # (header, value) guarding the model-repository protocol

    @staticmethod
    def _abort(context, e: DataPlaneError):
        context.abort(GRPC_STATUS[e.code], str(e))

    # -- health and metadata
    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=self.plane.live())

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.plane.ready())

    def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(**self.plane.server_metadata())

    def _config(self, name: str, version: str, context) -> mc.ModelConfig:
        try:
            return self.plane.config(name, version)
        except DataPlaneError as e:
            self._abort(context, e)

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    def ModelMetadata(self, request, context):
        try:
            md = self.plane.model_metadata(request.name, request.version)
        except DataPlaneError as e:
            self._abort(context, e)
        T = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=md["name"], versions=md["versions"], platform=md["platform"],
            inputs=[T(**t) for t in md["inputs"]], outputs=[T(**t) for t in md["outputs"]])

    def ModelConfig(self, request, context):
        return service_pb2.ModelConfigResponse(config=self._config(request.name, request.version, context))

    def ModelStatistics(self, request, context):
        names = [request.name] if request.name else sorted(self.repo.loaded)
        if request.name:
            self._config(request.name, request.version, context)
        out = []
        for n in names:
            st = dict(self.repo.stats.get(n, {}))
            if n == ENSEMBLE and self.repo.batch_timer is not None:
                st["execution_count"] = self.repo.batch_timer.executions  # one batched pass per dynamic batch
            out.append(service_pb2.ModelStatistics(name=n, version=str(max(self.repo.loaded[n])), **st))
        return service_pb2.ModelStatisticsResponse(model_stats=out)

    # -- model repository protocol (Triton's RepositoryIndex / RepositoryModelLoad / RepositoryModelUnload),
    # restricted like `tritonserver --grpc-restricted-protocol=model-repository:KEY=VALUE`: without the
    # header the call fails UNAVAILABLE with Triton's message (server src/grpc/grpc_handler.h,
    # CommonCallData::Execute / ExecutePrecondition). The header tritonserver checks is
    # "triton-grpc-protocol-" + KEY (src/grpc/grpc_server.h kRestrictedProtocolHeaderTemplate,
    # prepended when main.cc parses the flag); the bare KEY is refused.
    def _restricted(self, context) -> None:
        if self.restricted is None:
            return
        key, value = self.restricted
        header = GRPC_RESTRICTED_HEADER_PREFIX + key
        if dict(context.invocation_metadata()).get(header) != value:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"This protocol is restricted, expecting header '{header}'")

    def RepositoryIndex(self, request, context):
        self._restricted(context)
        keys, read = triton_repo.listing_from_dir(self.repo.path)
        M = service_pb2.RepositoryIndexResponse.ModelIndex
        out = []
        for n, m in sorted(triton_repo.load_listing(keys, read).items()):
            if n in self.repo.loaded:
                out += [M(name=n, version=str(v), state="READY") for v in self.repo.loaded[n]]
            elif request.ready:
                continue
            elif n in self.repo.unloaded:  # as tritonserver: unloaded models say so, with the version
                out += [M(name=n, version=str(v), state="UNAVAILABLE", reason="unloaded")
                        for v in self.repo.unloaded[n]]
            else:  # never loaded: tritonserver lists the name only (no version, state or reason)
                out.append(M(name=n))
        return service_pb2.RepositoryIndexResponse(models=out)

    def RepositoryModelLoad(self, request, context):
        self._restricted(context)
        if request.parameters:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "load parameters (config/file overrides) are not supported")
        if self.repo.control != "explicit":
            context.abort(grpc.StatusCode.UNAVAILABLE, "explicit model load / unload is not allowed if polling is "
                                                       "enabled or model control mode is none")
        try:
            self.repo.load([request.model_name])
        except triton_repo.RepositoryError as e:
            # tritonserver's codes and leading words (checked against it in tests/serving/test_real_triton.py):
            # a version policy selecting nothing is INVALID_ARGUMENT; anything found while polling the
            # repository is INTERNAL "failed to poll from model repository" (ours adds the reason, which
            # tritonserver writes to its log only)
            if triton_repo.NO_VERSION in str(e):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            context.abort(grpc.StatusCode.INTERNAL, f"failed to load '{request.model_name}', failed to poll from "
                                                    f"model repository: {e}")
        except Exception as e:  # noqa: BLE001 - a bad model fails its load, never the server
            log.exception("load of %s failed", request.model_name)
            context.abort(grpc.StatusCode.INTERNAL, f"failed to load '{request.model_name}': {type(e).__name__}: {e}")
        return service_pb2.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        self._restricted(context)
        if self.repo.control != "explicit":
            context.abort(grpc.StatusCode.UNAVAILABLE, "explicit model load / unload is not allowed if polling is "
                                                       "enabled or model control mode is none")
        try:
            self.repo.unload(request.model_name)
        except NotFound:
            context.abort(grpc.StatusCode.NOT_FOUND, f"failed to unload '{request.model_name}': not loaded")
        return service_pb2.RepositoryModelUnloadResponse()

    # -- inference
    def ModelInfer(self, request, context):
        try:
            inputs = self._wire_inputs(request)
            res = self.plane.infer(request.model_name, request.model_version, inputs,
                                   [o.name for o in request.outputs], Deadline.of(context), request.id)
        except DataPlaneError as e:
            self._abort(context, e)
        resp = service_pb2.ModelInferResponse(model_name=res.model, model_version=res.version, id=res.id)
        for n, dt, arr in res.outputs:
            resp.outputs.add(name=n, datatype=dt, shape=list(arr.shape))
            resp.raw_output_contents.append(serialize_byte_tensor(arr).item() if dt == "BYTES"
                                            else np.ascontiguousarray(arr).tobytes())
        return resp

    @staticmethod
    def _wire_inputs(request) -> list[InputTensor]:
        """gRPC ModelInferRequest -> InputTensors (raw_input_contents, or typed contents)."""
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise DataPlaneError(INVALID_ARG, f"[{request.model_name}] {len(request.inputs)} inputs but {len(raw)} "
                                              f"raw input contents")
        out = []
        for i, t in enumerate(request.inputs):
            if raw:
                out.append(InputTensor(t.name, t.datatype, list(t.shape), raw=raw[i]))
            elif t.datatype == "BYTES":
                out.append(InputTensor(t.name, t.datatype, list(t.shape), data=list(t.contents.bytes_contents)))
            else:
                c = t.contents
                data = list(c.fp32_contents or c.int64_contents or c.int_contents or c.bool_contents or [])
                out.append(InputTensor(t.name, t.datatype, list(t.shape), data=data if data else None))
        return out


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
                 metrics_port: int | None = None) -> tuple[grpc.Server, Repository, int]:
    guard = parse_restricted(restricted)
    r = Repository(repo, threads, control, load)
    # so_reuseport 0: bind exclusively. gRPC sets SO_REUSEPORT by default on Linux, so a second
    # server on a busy port would start and share its requests with the first (issue 14 item 2).
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
                         options=[("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE),
                                  ("grpc.max_send_message_length", MAX_SEND_MESSAGE),
                                  ("grpc.so_reuseport", 0)],
                         maximum_concurrent_rpcs=max_concurrent_rpcs)
    r.plane = DataPlane(r)  # the one data plane behind every front end (gRPC here, HTTP and metrics below)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(r, guard, r.plane), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpcio >= 1.5x raises instead of returning 0
        bound = 0
    if bound == 0:
        r.close()
        raise BindError(f"cannot listen on {host}:{port}: {_bind_error(host, port)} (port {port}; is another "
                      f"server running there? choose another with --grpc-port)")
    try:  # HTTP and metrics listen before gRPC answers, so a client that saw gRPC ready finds them up
        r.fronts = start_fronts(r, host, http_port, metrics_port)
    except BindError:
        r.close()
        raise
    server.start()
    return server, r, bound


def start_fronts(r: Repository, host: str, http_port: int | None, metrics_port: int | None) -> list:
    """Triton's other two ports over the same data plane: HTTP/REST (captioner.serving.server.http) and
    Prometheus /metrics (captioner.serving.server.metrics). Returns the started servers (each has stop())."""
    started = []
    try:
        if http_port is not None:
            from captioner.serving.server.http import start_http_server

            h = start_http_server(r.plane, host, http_port, MAX_RECEIVE_MESSAGE, MAX_CONCURRENT_RPCS)
            log.info("HTTP/REST on %s:%d", host, h.port)
            started.append(h)
        if metrics_port is not None:
            from captioner.serving.server.metrics import start_metrics_server

            m, mport = start_metrics_server(r.plane, host, metrics_port)
            log.info("metrics on http://%s:%d/metrics", host, mport)
            m.stop = m.shutdown
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
        server, r, bound = start_server(repo, host, port, threads=threads, control=control, load=load,
                                        restricted=restricted, http_port=http_port, metrics_port=metrics_port)
    except BindError as e:
        raise SystemExit(f"captioner serve: {e}") from None
    log.info("serving %s on %s:%d (model control %s; loaded: %s)", repo, host, bound, control,
             ", ".join(sorted(r.loaded)) or "none")
    stop = threading.Event()

    def _term(signum, _frame):
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    stop.wait()
    for f in r.fronts:
        f.stop()
    server.stop(grace=5).wait()
    r.close()
    log.info("server stopped cleanly")
