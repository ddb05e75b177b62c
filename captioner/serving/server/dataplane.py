"""The data plane of `captioner serve`: one layer that every protocol front end hands off to
(KServe's server layout: `kserve/protocol/dataplane.py` behind its REST and gRPC servers).

The gRPC Servicer (captioner.serving.server.grpc) and the HTTP/REST app
(captioner.serving.server.http) get a DataPlane and only decode their wire format into
`InputTensor`s and encode `InferResult`s back; validation against the model configuration,
running the model, model statistics, the model-repository protocol (index, load, unload) and
the request outcomes behind the Prometheus metrics (captioner.serving.server.metrics) happen
here, once. It imports nothing of the fronts nor of the runtime (its `repo` is given), so the
HTTP front needs neither onnxruntime nor tokenizers to import. Errors are `DataPlaneError(code, message)` with
Triton's error codes; each front end maps the code to its status (gRPC StatusCode; HTTP status
as Triton's src/http_server.cc `HttpCodeFromError`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from captioner import __version__
from captioner.core.names import ENSEMBLE
from captioner.serving import triton_repo
from captioner.serving.errors import RequestError
from captioner.serving.server.codec import InputTensor, decode_inputs, dtype_of
from captioner.serving.server.errors import Deadline, Expired, NotFound, ShuttingDown
from captioner.serving.server.stats import TIMING, ModelStats

log = logging.getLogger(__name__)

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

PLATFORM = {"onnxruntime": "onnxruntime_onnx", "python": "python"}


class DataPlaneError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


@dataclass
class InferResult:
    model: str
    version: str
    id: str
    outputs: list[tuple[str, str, np.ndarray]]  # (name, datatype, array)


class DataPlane:
    """Health, metadata, configuration, statistics, model control and inference over a
    `captioner.serving.server.runtime.Repository`."""

    def __init__(self, repo):
        self.repo = repo

    # -- health and metadata
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def server_metadata(self) -> dict:
        return {"name": "captioner-local", "version": __version__,
                "extensions": ["classification", "model_configuration", "binary_tensor_data", "statistics"]}

    def version(self, name: str, version: str = "") -> int:
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
        return triton_repo.autocomplete(self.repo.models[name].config)  # what tritonserver answers after loading

    def model_metadata(self, name: str, version: str = "") -> dict:
        cfg = self.config(name, version)
        batch = [-1] if cfg.max_batch_size > 0 else []

        def t(x):
            return {"name": x.name, "datatype": dtype_of(x)[0], "shape": batch + list(x.dims)}

        return {"name": cfg.name, "versions": [str(v) for v in self.repo.loaded[cfg.name]],
                "platform": cfg.platform or PLATFORM.get(cfg.backend, cfg.backend),
                "inputs": [t(x) for x in cfg.input], "outputs": [t(x) for x in cfg.output]}

    def model_statistics(self, name: str = "", version: str = "") -> list[dict]:
        """Triton's ModelStatistics: one entry per loaded model (or the one named), at its latest
        loaded version: inference_count (batch items), execution_count (model runs; the ensemble's
        are its dynamic batches), last_inference (ms since the epoch)."""
        if name:
            self.config(name, version)  # NOT_FOUND / INVALID_ARG as the config RPC
        out = []
        for n in [name] if name else sorted(self.repo.loaded):
            v = str(max(self.repo.loaded[n]))
            st = self.repo.stats.of(n, v)
            out.append({"name": n, "version": v, "inference_count": st.inference_count,
                        "execution_count": st.exec_count, "last_inference": st.last_inference})
        return out

    # -- model repository protocol (Triton's RepositoryIndex / RepositoryModelLoad / RepositoryModelUnload)
    def repository_index(self, ready: bool = False) -> list[dict]:
        """Every model of the repository (re-read now), as tritonserver lists it."""
        keys, read = triton_repo.listing_from_dir(self.repo.path)
        out = []
        for n, m in sorted(triton_repo.load_listing(keys, read).items()):
            if n in self.repo.loaded:
                out += [{"name": n, "version": str(v), "state": "READY"} for v in self.repo.loaded[n]]
            elif ready:
                continue
            elif n in self.repo.unloaded:  # as tritonserver: unloaded models say so, with the version
                out += [{"name": n, "version": str(v), "state": "UNAVAILABLE", "reason": "unloaded"}
                        for v in self.repo.unloaded[n]]
            else:  # never loaded: tritonserver lists the name only (no version, state or reason)
                out.append({"name": n})
        return out

    def _explicit(self) -> None:
        if self.repo.control != "explicit":
            raise DataPlaneError(UNAVAILABLE, "explicit model load / unload is not allowed if polling is "
                                              "enabled or model control mode is none")

    def load_model(self, name: str, parameters: bool = False) -> None:
        """Load `name` (and its ensemble steps) from the repository as it is now. `parameters`:
        the request carried load parameters (config/file overrides), which are refused."""
        if parameters:
            raise DataPlaneError(INVALID_ARG, "load parameters (config/file overrides) are not supported")
        self._explicit()
        try:
            self.repo.load([name])
        except triton_repo.RepositoryError as e:
            # tritonserver's codes and leading words (checked against it in tests/serving/test_triton_server.py):
            # a version policy selecting nothing is INVALID_ARGUMENT; anything found while polling the
            # repository is INTERNAL "failed to poll from model repository" (ours adds the reason, which
            # tritonserver writes to its log only)
            if triton_repo.NO_VERSION in str(e):
                raise DataPlaneError(INVALID_ARG, str(e)) from None
            raise DataPlaneError(INTERNAL, f"failed to load '{name}', failed to poll from model repository: {e}") \
                from None
        except Exception as e:  # noqa: BLE001 - a bad model fails its load, never the server
            log.exception("load of %s failed", name)
            raise DataPlaneError(INTERNAL, f"failed to load '{name}': {type(e).__name__}: {e}") from None

    def unload_model(self, name: str) -> None:
        self._explicit()
        try:
            self.repo.unload(name)
        except NotFound:
            raise DataPlaneError(NOT_FOUND, f"failed to unload '{name}': not loaded") from None

    # -- inference
    def infer(self, name: str, version: str, inputs: list[InputTensor], outputs: list[str] | None = None,
              deadline: Deadline | None = None, request_id: str = "") -> InferResult:
        """Validate `inputs` against the model's config, run it, return the requested outputs
        (all when `outputs` is empty). Every outcome is counted for the metrics."""
        t0 = time.monotonic()
        v = self.version(name, version)  # unknown model: not counted, as in Triton (no model to label)
        timing: dict = {}
        try:
            cfg = self.repo.models[name].config
            check_outputs(cfg, outputs)  # an unknown output is refused before the model runs
            arrays = decode_inputs(cfg, inputs)
            for t in inputs:  # the wire buffers (an HTTP body's memoryviews) are released once decoded
                t.raw = t.data = None
            if name == ENSEMBLE:
                arrays[TIMING] = timing
            out = self.repo.run(name, arrays, v, deadline or Deadline())
            result = InferResult(name, version or "", request_id, select_outputs(cfg, out, outputs))
        except DataPlaneError as e:
            self._count(name, v, t0, error=e.code)
            raise
        except Expired as e:
            code = CANCELLED if str(e) == "cancelled" else DEADLINE
            self._count(name, v, t0, error=code)
            raise DataPlaneError(code, f"[{name}] {e}: request dropped") from None
        except ShuttingDown as e:
            self._count(name, v, t0, error=UNAVAILABLE)
            raise DataPlaneError(UNAVAILABLE, f"[{name}] {e}") from None
        except ValueError as e:  # RequestError included: bad input
            self._count(name, v, t0, error=INVALID_ARG)
            raise DataPlaneError(INVALID_ARG, f"[{name}] {e}") from None
        except Exception as e:  # noqa: BLE001 - a failure is this request's, never the server's
            log.exception("model %s failed", name)
            self._count(name, v, t0, error=INTERNAL)
            raise DataPlaneError(INTERNAL, f"[{name}] {type(e).__name__}: {e}") from None
        self._count(name, v, t0, timing=timing)
        return result

    def _count(self, name: str, v: int, t0: float, error: str | None = None, timing: dict | None = None) -> None:
        """A request's outcome and durations; its batch items and executions are the runtime's."""
        t1 = time.monotonic()
        request_us = int((t1 - t0) * 1e6)
        if error is not None:
            self.repo.stats.request(name, v, request_us, failure=REASONS[error])
        elif timing and "start" in timing:  # batched (ensemble): queued until its batch ran
            self.repo.stats.request(name, v, request_us,
                                    queue_us=int((timing["start"] - timing.get("submit", timing["start"])) * 1e6),
                                    compute_us=int((timing["end"] - timing["start"]) * 1e6))
        else:  # run directly: no queue
            self.repo.stats.request(name, v, request_us, compute_us=request_us)

    def stats(self) -> dict[tuple[str, str], ModelStats]:
        """A copy of the per-(model, version) statistics (what the metrics front renders)."""
        return self.repo.stats.snapshot()


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


def check_outputs(cfg: mc.ModelConfig, requested: list[str] | None) -> None:
    known = [o.name for o in cfg.output]
    for n in requested or []:
        if n not in known:
            raise RequestError(f"unknown output '{n}' requested (model outputs: {', '.join(known)})")


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
