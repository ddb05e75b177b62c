"""A test double of Triton's `triton_python_backend_utils`, installed through sys.modules.

Tensors, requests and responses behave like the real module's for what the captioner
models use; `InferenceRequest.exec()` runs the named model of the exported repository in
onnxruntime, after checking the request's tensor names, dtypes and shapes against that
model's config.pbtxt, as Triton would.
"""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np

from captioner.export import read_config
from captioner.onnx_runtime import session

NP = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_STRING": np.object_}


class TritonError(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self._msg = msg

    def message(self):
        return self._msg


class Tensor:
    def __init__(self, name, array):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"Tensor '{name}' needs a numpy array, got {type(array).__name__}")
        self._name, self._a = name, array

    def name(self):
        return self._name

    def as_numpy(self):
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
    def __init__(self, repo: Path):
        self.repo = Path(repo)
        self.sessions, self.configs, self.calls = {}, {}, []

    def run(self, model, inputs, outputs):
        cfg = self.configs.get(model)
        if cfg is None:
            p = self.repo / model / "config.pbtxt"
            if not p.exists():
                return InferenceResponse(error=TritonError(f"Request for unknown model: '{model}' is not found"))
            cfg = self.configs[model] = read_config(p)
        spec = {t.name: t for t in cfg.input}
        feed = {}
        from tritonclient.grpc import model_config_pb2 as mc

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
        if model not in self.sessions:
            self.sessions[model] = session(self.repo / model / "1" / "model.onnx")
        self.calls.append((model, {k: v.shape for k, v in feed.items()}))
        res = self.sessions[model].run(list(outputs), feed)
        return InferenceResponse([Tensor(n, a) for n, a in zip(outputs, res)])


_backend: _Backend | None = None


class InferenceRequest:
    def __init__(self, model_name, requested_output_names, inputs, **_):
        self.model_name, self.outputs, self.inputs = model_name, list(requested_output_names), list(inputs)

    def exec(self):
        return _backend.run(self.model_name, self.inputs, self.outputs)


def make_module(repo: Path) -> types.ModuleType:
    global _backend
    _backend = _Backend(repo)
    m = types.ModuleType("triton_python_backend_utils")
    for n in ("Tensor", "InferenceResponse", "InferenceRequest", "TritonError", "get_input_tensor_by_name",
              "get_output_tensor_by_name"):
        setattr(m, n, globals()[n])
    m.backend = _backend
    return m
