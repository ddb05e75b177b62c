"""The wire codec of Triton's inference protocol (KServe v2), in one place for the builtin
server's gRPC and HTTP/REST fronts and for the web gateway's gRPC client: BYTES tensors (each
element a 4-byte little-endian length, then its bytes: `raw_input_contents`, HTTP binary data),
raw tensor contents, ModelInferRequest / ModelInferResponse packing, and wire tensors checked
against a model configuration into arrays.

numpy and the protocol's protobuf types only (no tokenizers, no onnxruntime): the gateway image
imports it.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2

from captioner.serving.errors import RequestError

LENGTH = struct.Struct("<I")  # a BYTES element's length prefix
# ModelInferRequest.raw_input_contents is field 7, length-delimited (wire type 2): tag (7 << 3) | 2
RAW_INPUT_CONTENTS_TAG = b"\x3a"

DTYPES = {  # config enum name -> (protocol datatype, numpy dtype)
    "TYPE_FP32": ("FP32", np.float32), "TYPE_INT64": ("INT64", np.int64), "TYPE_INT32": ("INT32", np.int32),
    "TYPE_STRING": ("BYTES", np.object_), "TYPE_FP16": ("FP16", np.float16), "TYPE_BOOL": ("BOOL", np.bool_),
}


def dtype_of(t) -> tuple[str, type]:
    """A config tensor's (protocol datatype, numpy dtype)."""
    return DTYPES[mc.DataType.Name(t.data_type)]


# -- BYTES tensors -------------------------------------------------------------------------------
def bytes_elements(buf: bytes | memoryview, n: int | None, name: str) -> np.ndarray:
    """A raw BYTES tensor -> object array of its elements (n of them; None: however many it
    holds). The prefixes are walked and the walk stops at the first element beyond n, so a
    payload of millions of elements costs nothing; a prefix that is cut short or runs past the
    end is a RequestError naming the element."""
    out: list[bytes] = []
    off, end = 0, len(buf)
    while off < end:
        if len(out) == n:
            raise RequestError(f"input '{name}' holds more than {n} element(s), its shape needs {n}")
        if off + 4 > end:
            raise RequestError(f"input '{name}' element {len(out)}: BYTES length prefix cut short at byte "
                               f"{off} of {end}")
        (k,) = LENGTH.unpack_from(buf, off)
        off += 4
        if k > end - off:
            raise RequestError(f"input '{name}' element {len(out)}: BYTES length prefix declares {k} bytes but "
                               f"only {end - off} follow")
        out.append(bytes(buf[off:off + k]))  # a bytes copy also when `buf` is a memoryview of an HTTP body
        off += k
    if n is not None and len(out) != n:
        raise RequestError(f"input '{name}' holds {len(out)} elements, its shape needs {n}")
    arr = np.empty(len(out), dtype=np.object_)
    arr[:] = out
    return arr


def bytes_parts(items: Iterable[bytes | memoryview]) -> list:
    """The pieces of a BYTES tensor (prefix, element, prefix, ...), for one join that copies each
    element once."""
    parts: list = []
    for x in items:
        parts += [LENGTH.pack(len(x)), x]
    return parts


def serialize_bytes(arr: np.ndarray) -> bytes:
    """An object (or np.bytes_) array -> its raw BYTES tensor, row-major, as tritonclient's
    utils.serialize_byte_tensor writes it: a bytes element as is, anything else as str() in
    UTF-8. An empty array is b''."""
    if arr.dtype == np.object_:
        items = [x if type(x) is bytes else str(x).encode("utf-8") for x in arr.reshape(-1)]
    elif arr.dtype.type == np.bytes_:
        items = [bytes(x) for x in arr.reshape(-1)]
    else:
        raise ValueError(f"cannot serialize a {arr.dtype} array as a BYTES tensor")
    return b"".join(bytes_parts(items))


def raw_contents(datatype: str, arr: np.ndarray) -> bytes:
    """An output array -> its raw contents (gRPC raw_output_contents, HTTP binary data)."""
    return serialize_bytes(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()


# -- messages ------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def infer_request(model: str, inputs: list[tuple[str, str, list[int], list]], outputs: list[str]) -> bytes:
    """A serialized ModelInferRequest. `inputs`: (name, datatype, shape, contents), contents a list
    of bytes-like pieces that make the input's raw contents. The metadata is written by protobuf
    and each raw_input_contents entry appended as field 7 (in the inputs' order, as the protocol
    pairs them), so large inputs are copied once, into the message, not three times as through
    tritonclient."""
    req = service_pb2.ModelInferRequest(model_name=model)
    for name, datatype, shape, _ in inputs:
        req.inputs.add(name=name, datatype=datatype, shape=shape)
    for name in outputs:
        req.outputs.add(name=name)
    parts = [req.SerializeToString()]
    for *_, contents in inputs:
        parts += [RAW_INPUT_CONTENTS_TAG, _varint(sum(len(c) for c in contents)), *contents]
    return b"".join(parts)


def infer_response(model: str, version: str, request_id: str,
                   outputs: list[tuple[str, str, np.ndarray]]) -> service_pb2.ModelInferResponse:
    """(name, datatype, array) outputs -> a ModelInferResponse with raw_output_contents."""
    resp = service_pb2.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name, datatype, arr in outputs:
        resp.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        resp.raw_output_contents.append(raw_contents(datatype, arr))
    return resp


# -- wire tensors -> arrays ----------------------------------------------------------------------
@dataclass
class InputTensor:
    """One input as its wire delivered it: `raw` bytes (gRPC raw_input_contents, HTTP binary
    data) or `data`, a flat list of elements (gRPC typed contents, HTTP JSON)."""
    name: str
    datatype: str
    shape: list[int]
    raw: bytes | memoryview | None = None
    data: list | None = None


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


def decode_inputs(cfg: mc.ModelConfig, inputs: list[InputTensor]) -> dict[str, np.ndarray]:
    """Wire tensors -> arrays, checked against the config: names, datatypes, shapes, batch
    bounds, element counts (a BYTES payload's length prefixes are walked only up to the count
    its shape needs)."""
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
