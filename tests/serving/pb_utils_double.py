"""A test double of Triton's `triton_python_backend_utils`, installed through sys.modules.

It follows python_backend's behaviour (triton-inference-server/python_backend r24.10, the release
deployment.TRITON_RELEASE pins; the cited parts are the same in r25.01), not ours:
- src/pb_tensor.cc `PbTensor::AsNumpy`: a tensor not in CPU memory raises
  "Tensor is stored in GPU and cannot be converted to NumPy." (TritonModelException).
- BLS (README "Business Logic Scripting", src/infer_request.h `PreferredMemory`,
  src/request_executor.cc): the callee's outputs come back in the memory the callee produced
  them in (an onnxruntime model with a KIND_GPU instance group produces GPU tensors) unless
  the request's `preferred_memory` asks for CPU (TRITONSERVER_MEMORY_CPU).
- A BLS request to a model (or version) that is not loaded fails with core's message
  (core src/model_repository_manager/model_repository_manager.cc `GetModel`): "Request for
  unknown model: '<name>' is not found".
  What is loaded is decided by `captioner.serving.triton_repo.plan_load` (explicit mode: the named
  models plus ensemble steps; BLS targets are not loaded for you).
Requests are also checked against the callee's config.pbtxt (names, dtypes, shapes, batch).
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from captioner.serving.onnx_runtime import session
from captioner.serving.triton_repo import ALL_MODELS, listing_from_dir, load_listing, plan_load

NP = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_STRING": np.object_}
TRITONSERVER_MEMORY_CPU, TRITONSERVER_MEMORY_CPU_PINNED, TRITONSERVER_MEMORY_GPU = 0, 1, 2


class TritonError(Exception):
    # python_backend src/pb_error.h / pb_stub.cc: the codes are TRITONSERVER_Error_Code values,
    # and a TritonError built without one is INTERNAL
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, msg, code=1):
        super().__init__(msg)
        self._msg, self._code = msg, code

    def message(self):
        return self._msg

    def code(self):
        return self._code


class TritonModelException(Exception):
    """What python_backend raises in the stub for PythonBackendException."""


class PreferredMemory:
    def __init__(self, preferred_memory_type, preferred_device_id=0):
        self.preferred_memory_type, self.preferred_device_id = preferred_memory_type, preferred_device_id


class Tensor:
    def __init__(self, name, array, _gpu=False):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"Tensor '{name}' needs a numpy array, got {type(array).__name__}")
        self._name, self._a, self._gpu = name, array, _gpu

    def name(self):
        return self._name

    def is_cpu(self):
        return not self._gpu

    def as_numpy(self):
        if self._gpu:
            raise TritonModelException("Tensor is stored in GPU and cannot be converted to NumPy.")
        return self._a


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        self._out = {t.name(): t for t in output_tensors or []}
        self._error = error

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error

    def output_tensors(self):
        return list(self._out.values())


class FakeRequest:
    """What Triton hands to execute(): named input tensors."""

    def __init__(self, **tensors):
        self._in = {k: Tensor(k, v) for k, v in tensors.items()}

    def inputs(self):
        return list(self._in.values())


def get_input_tensor_by_name(request, name):
    return request._in.get(name)


def get_output_tensor_by_name(response, name):
    return response._out.get(name)


class _Backend:
    """The models a Triton started with `--model-control-mode=explicit --load-model=...` holds."""

    def __init__(self, repo: Path, load=ALL_MODELS):
        self.repo = Path(repo)
        keys, read = listing_from_dir(self.repo)
        self.models = load_listing(keys, read)
        self.loaded = {n: self.models[n].selected for n in plan_load(self.models, load)}
        self.sessions, self.calls = {}, []
        self.bls_bytes = 0  # bytes crossing a BLS exec() (inputs and outputs), since the last reset

    def reset_counts(self):
        self.calls, self.bls_bytes = [], 0

    def run(self, model, version, inputs, outputs, preferred):
        versions = self.loaded.get(model)
        if not versions or (version != -1 and version not in versions):
            what = f"'{model}'" + (f" version {version}" if version != -1 else "")
            return InferenceResponse(error=TritonError(f"Request for unknown model: {what} is not found"))
        version = max(versions) if version == -1 else version
        cfg = self.models[model].config
        spec = {t.name: t for t in cfg.input}
        feed = {}
        for t in inputs:
            s = spec.get(t.name())
            a = t.as_numpy()
            if s is None:
                return InferenceResponse(error=TritonError(f"unexpected inference input '{t.name()}' for '{model}'"))
            want = NP[mc.DataType.Name(s.data_type)]
            if a.dtype != want:
                return InferenceResponse(error=TritonError(f"'{t.name()}' dtype {a.dtype}, expected {np.dtype(want)}"))
            dims = [-1] + list(s.dims)
            if a.ndim != len(dims) or any(d != -1 and g != d for g, d in zip(a.shape, dims)):
                return InferenceResponse(error=TritonError(f"'{t.name()}' shape {list(a.shape)}, expected {dims}"))
            if a.shape[0] > cfg.max_batch_size:
                return InferenceResponse(error=TritonError(f"batch {a.shape[0]} > max_batch_size {cfg.max_batch_size}"))
            feed[t.name()] = a
        known = {o.name for o in cfg.output}
        for o in outputs:
            if o not in known:
                return InferenceResponse(error=TritonError(f"unknown requested output '{o}' for '{model}'"))
        if (model, version) not in self.sessions:
            self.sessions[model, version] = session(self.repo / model / str(version) / "model.onnx")
        self.calls.append((model, {k: v.shape for k, v in feed.items()}))
        res = self.sessions[model, version].run(list(outputs), feed)
        self.bls_bytes += sum(a.nbytes for a in feed.values()) + sum(np.asarray(a).nbytes for a in res)
        on_gpu = any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in cfg.instance_group) or not cfg.instance_group
        if preferred is not None and preferred.preferred_memory_type in (TRITONSERVER_MEMORY_CPU,
                                                                        TRITONSERVER_MEMORY_CPU_PINNED):
            on_gpu = False
        return InferenceResponse([Tensor(n, a, _gpu=on_gpu) for n, a in zip(outputs, res)])


_backend: _Backend | None = None


class InferenceRequest:
    def __init__(self, model_name, requested_output_names, inputs, model_version=-1, preferred_memory=None, **_):
        self.model_name, self.outputs, self.inputs = model_name, list(requested_output_names), list(inputs)
        self.model_version, self.preferred_memory = int(model_version), preferred_memory

    def exec(self):
        return _backend.run(self.model_name, self.model_version, self.inputs, self.outputs, self.preferred_memory)


def make_module(repo: Path, load=ALL_MODELS) -> types.ModuleType:
    global _backend
    _backend = _Backend(repo, load)
    m = types.ModuleType("triton_python_backend_utils")
    for n in ("Tensor", "InferenceResponse", "InferenceRequest", "TritonError", "TritonModelException",
              "PreferredMemory", "TRITONSERVER_MEMORY_CPU", "TRITONSERVER_MEMORY_CPU_PINNED", "TRITONSERVER_MEMORY_GPU",
              "get_input_tensor_by_name", "get_output_tensor_by_name"):
        setattr(m, n, globals()[n])
    m.backend = _backend
    return m


def model_args(repo: Path, model: str, version: int = 1) -> dict:
    """The `args` Triton passes to initialize() (python_backend src/pb_stub.cc)."""
    return {"model_repository": str(Path(repo) / model), "model_version": str(version), "model_name": model,
            "model_config": json.dumps({"name": model})}


class TransferMeter:
    """Counts the bytes an in-process onnxruntime caller moves between host memory and the
    session's device, at the onnxruntime Python API where such copies happen
    (onnxruntime/python/onnxruntime_inference_collection.py): `OrtValue.ortvalue_from_numpy`
    and `IOBinding.bind_cpu_input` (host -> device), `OrtValue.numpy` and
    `IOBinding.copy_outputs_to_cpu` (device -> host), and `InferenceSession.run`, which feeds
    and returns host arrays. On the CPU execution provider the copies are cheap, on CUDA they
    are PCIe transfers; the count is the same."""

    def __init__(self, monkeypatch):
        import onnxruntime as ort

        self.to_device: list[int] = []
        self.to_host: list[int] = []
        meter = self
        OrtValue, IOBinding, Session = ort.OrtValue, ort.IOBinding, ort.InferenceSession
        from_numpy, bind_cpu, to_np, copy_out, run = (OrtValue.ortvalue_from_numpy, IOBinding.bind_cpu_input,
                                                      OrtValue.numpy, IOBinding.copy_outputs_to_cpu, Session.run)

        def _from_numpy(cls, a, *args, **kw):
            meter.to_device.append(np.asarray(a).nbytes)
            return from_numpy(a, *args, **kw)

        def _bind_cpu(self, name, a):
            meter.to_device.append(np.asarray(a).nbytes)
            return bind_cpu(self, name, a)

        def _numpy(self):
            a = to_np(self)
            meter.to_host.append(a.nbytes)
            return a

        def _copy_out(self):
            out = copy_out(self)
            meter.to_host.extend(np.asarray(a).nbytes for a in out)
            return out

        def _run(self, output_names, input_feed, *args, **kw):
            meter.to_device.extend(np.asarray(a).nbytes for a in input_feed.values())
            out = run(self, output_names, input_feed, *args, **kw)
            meter.to_host.extend(np.asarray(a).nbytes for a in out)
            return out

        monkeypatch.setattr(OrtValue, "ortvalue_from_numpy", classmethod(_from_numpy))
        monkeypatch.setattr(IOBinding, "bind_cpu_input", _bind_cpu)
        monkeypatch.setattr(OrtValue, "numpy", _numpy)
        monkeypatch.setattr(IOBinding, "copy_outputs_to_cpu", _copy_out)
        monkeypatch.setattr(Session, "run", _run)

    def reset(self):
        self.to_device, self.to_host = [], []
