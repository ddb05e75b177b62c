"""The wire codec in process (captioner.serving.server.codec, and the HTTP front's binary-data
parsing that feeds it): BYTES tensors, ModelInfer packing, the binary tensor data extension
(triton-inference-server/server docs/protocol/extension_binary_data.md) and JSON tensors checked
against a model configuration. No server is started."""
import json
import struct

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2
from tritonclient.utils import serialize_byte_tensor

from captioner.core import names
from captioner.serving.errors import RequestError
from captioner.serving.server.codec import (LENGTH, InputTensor, bytes_elements, bytes_parts, decode_inputs,
                                            infer_request, infer_response, raw_contents, serialize_bytes)
from captioner.serving.server.dataplane import DataPlaneError
from captioner.serving.server.http import parse_infer_body


def _tensor(items) -> bytes:
    return b"".join(bytes_parts(items))


# -- BYTES tensors -------------------------------------------------------------------------------
def test_bytes_round_trip_keeps_every_element():
    items = [b"", b"a", b"\x00\xff" * 300, "caption \u00e9".encode(), b"x" * 70_000]
    arr = np.empty(len(items), dtype=np.object_)
    arr[:] = items
    buf = serialize_bytes(arr)
    assert buf == _tensor(items)
    assert list(bytes_elements(buf, len(items), "T")) == items
    assert list(bytes_elements(memoryview(buf), None, "T")) == items  # the whole payload, however many
    assert bytes_elements(b"", 0, "T").shape == (0,) and serialize_bytes(np.empty(0, np.object_)) == b""


def test_serialize_bytes_is_tritonclients_layout():
    arr = np.array([[b"ab", "c\u00e9"], [b"", 7]], dtype=object)  # str and other objects as str() in UTF-8
    assert serialize_bytes(arr) == serialize_byte_tensor(arr).item()
    fixed = np.array([b"ab", b"cde"], dtype=np.bytes_)
    assert serialize_bytes(fixed) == serialize_byte_tensor(fixed).item()
    assert raw_contents("FP32", np.ones((2, 2), np.float32)) == np.ones(4, np.float32).tobytes()


@pytest.mark.parametrize("buf,n,needle", [
    (b"\x05\x00", 1, "element 0: BYTES length prefix cut short at byte 0 of 2"),
    (LENGTH.pack(1) + b"a" + b"\x02", 2, "element 1: BYTES length prefix cut short at byte 5 of 6"),
    (LENGTH.pack(100) + b"abc", 1, "element 0: BYTES length prefix declares 100 bytes but only 3 follow"),
    (LENGTH.pack(2**32 - 1), 1, "declares 4294967295 bytes but only 0 follow"),
    (LENGTH.pack(1) + b"a", 2, "holds 1 elements, its shape needs 2"),
    (b"", 1, "holds 0 elements, its shape needs 1"),
])
def test_bad_length_prefixes_name_the_element(buf, n, needle):
    with pytest.raises(RequestError, match=needle):
        bytes_elements(buf, n, "IMAGE")


def test_element_count_is_checked_while_walking():
    """Two million empty elements for a one-element tensor: refused at the second prefix."""
    with pytest.raises(RequestError, match="holds more than 1 element"):
        bytes_elements(LENGTH.pack(0) * 2_000_000, 1, "IMAGE")


# -- messages ------------------------------------------------------------------------------------
def test_infer_request_is_what_protobuf_writes():
    """The hand-appended raw_input_contents (field 7) give the bytes protobuf itself writes."""
    images = [memoryview(b"\x89PNG" * 10), memoryview(b"")]
    beams = struct.pack("<i", 3) * 2
    msg = infer_request("captioner", [(names.IMAGE, "BYTES", [2, 1], bytes_parts(images)),
                                      (names.BEAM_SIZE, "INT32", [2, 1], [beams])], [names.CAPTION])
    want = service_pb2.ModelInferRequest(model_name="captioner")
    want.inputs.add(name=names.IMAGE, datatype="BYTES", shape=[2, 1])
    want.inputs.add(name=names.BEAM_SIZE, datatype="INT32", shape=[2, 1])
    want.outputs.add(name=names.CAPTION)
    want.raw_input_contents.extend([_tensor(images), beams])
    assert msg == want.SerializeToString()
    back = service_pb2.ModelInferRequest.FromString(msg)
    assert list(bytes_elements(back.raw_input_contents[0], 2, names.IMAGE)) == [b"\x89PNG" * 10, b""]


def test_infer_response_packs_raw_output_contents():
    caps = np.array([[b"a cat"], ["a dog"]], dtype=object)
    hidden = np.arange(6, dtype=np.float32).reshape(2, 3)
    resp = infer_response("captioner", "1", "req-7", [(names.CAPTION, "BYTES", caps), ("H", "FP32", hidden)])
    assert (resp.model_name, resp.model_version, resp.id) == ("captioner", "1", "req-7")
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [(names.CAPTION, "BYTES", [2, 1]),
                                                                         ("H", "FP32", [2, 3])]
    assert list(bytes_elements(resp.raw_output_contents[0], 2, names.CAPTION)) == [b"a cat", b"a dog"]
    np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[1], np.float32).reshape(2, 3), hidden)


# -- the binary tensor data extension (HTTP/REST front) ------------------------------------------
def _body(head: dict, blob: bytes) -> tuple[bytes, str]:
    text = json.dumps(head).encode()
    return text + blob, str(len(text))


def test_binary_data_inputs_are_views_in_input_order():
    img = _tensor([b"jpeg-1", b"jpeg-22"])
    beam = struct.pack("<i", 2) * 2
    body, n = _body({"id": "r1", "inputs": [
        {"name": names.IMAGE, "datatype": "BYTES", "shape": [2, 1], "parameters": {"binary_data_size": len(img)}},
        {"name": names.BEAM_SIZE, "datatype": "INT32", "shape": [2, 1], "parameters": {"binary_data_size": 8}},
        {"name": names.MAX_TOKENS, "datatype": "INT32", "shape": [2, 1], "data": [[5], [6]]}],
        "outputs": [{"name": names.CAPTION, "parameters": {"binary_data": True}}]}, img + beam)
    req, inputs, outs = parse_infer_body(body, n)
    assert req["id"] == "r1" and outs == [{"name": names.CAPTION, "parameters": {"binary_data": True}}]
    assert [(t.name, t.datatype, t.shape) for t in inputs] == [(names.IMAGE, "BYTES", [2, 1]),
                                                               (names.BEAM_SIZE, "INT32", [2, 1]),
                                                               (names.MAX_TOKENS, "INT32", [2, 1])]
    assert isinstance(inputs[0].raw, memoryview) and bytes(inputs[0].raw) == img and bytes(inputs[1].raw) == beam
    assert inputs[2].raw is None and inputs[2].data == [5, 6]  # nested JSON data is flattened row-major


def test_a_json_only_body_needs_no_header_length():
    body, _ = _body({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 2], "data": [1.5, 2]}]}, b"")
    _, inputs, outs = parse_infer_body(body, None)
    assert inputs[0].data == [1.5, 2] and outs == []


@pytest.mark.parametrize("case,needle", [
    ("extra bytes", "binary bytes that no input's binary_data_size claims"),
    ("size past the end", "runs past the"),
    ("header length not a number", "Inference-Header-Content-Length must be an integer"),
    ("header length past the body", "is outside the body's"),
    ("size negative", "binary_data_size' must be an integer in [0,"),
    ("no data", "has neither 'data' nor binary_data_size"),
])
def test_binary_data_sizes_must_add_up(case, needle):
    img = _tensor([b"abc"])
    size = {"size past the end": len(img) + 1, "size negative": -1}.get(case, len(img))
    inp = {"name": names.IMAGE, "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": size}}
    if case == "no data":
        inp.pop("parameters")
    body, n = _body({"inputs": [inp]}, img + (b"zz" if case == "extra bytes" else b""))
    n = {"header length not a number": "12a", "header length past the body": str(len(body) + 1)}.get(case, n)
    with pytest.raises(DataPlaneError, match=needle.replace("[", r"\[")) as e:
        parse_infer_body(body, n)
    assert e.value.http_status == 400


# -- wire tensors checked against a model configuration ------------------------------------------
def _config(max_batch: int = 8) -> mc.ModelConfig:
    return mc.ModelConfig(name="m", max_batch_size=max_batch, input=[
        mc.ModelInput(name=names.IMAGE, data_type=mc.TYPE_STRING, dims=[1]),
        mc.ModelInput(name=names.BEAM_SIZE, data_type=mc.TYPE_INT32, dims=[1], optional=True),
        mc.ModelInput(name="F", data_type=mc.TYPE_FP32, dims=[2], optional=True),
        mc.ModelInput(name="B", data_type=mc.TYPE_BOOL, dims=[1], optional=True)])


def _image(n: int = 1) -> InputTensor:
    return InputTensor(names.IMAGE, "BYTES", [n, 1], raw=_tensor([b"img"] * n))


def test_decode_inputs_gives_arrays_of_the_configured_types():
    got = decode_inputs(_config(), [_image(2), InputTensor(names.BEAM_SIZE, "INT32", [2, 1], data=[1, 8]),
                                    InputTensor("F", "FP32", [2, 2], raw=np.ones(4, np.float32).tobytes()),
                                    InputTensor("B", "BOOL", [2, 1], data=[True, False])])
    assert got[names.IMAGE].shape == (2, 1) and got[names.IMAGE][1, 0] == b"img"
    assert got[names.BEAM_SIZE].dtype == np.int32 and got[names.BEAM_SIZE].tolist() == [[1], [8]]
    assert got["F"].dtype == np.float32 and got["F"].shape == (2, 2)
    assert got["B"].dtype == np.bool_
    text = decode_inputs(_config(), [InputTensor(names.IMAGE, "BYTES", [1, 1], data=["a caption"])])
    assert text[names.IMAGE][0, 0] == b"a caption"  # JSON strings become UTF-8 bytes


@pytest.mark.parametrize("tensor,needle", [
    (InputTensor(names.BEAM_SIZE, "INT32", [1, 1], data=[2**31]), "INT32 elements must be integers in"),
    (InputTensor(names.BEAM_SIZE, "INT32", [1, 1], data=[-(2**31) - 1]), "INT32 elements must be integers in"),
    (InputTensor(names.BEAM_SIZE, "INT32", [1, 1], data=[True]), "got True"),
    (InputTensor(names.BEAM_SIZE, "INT32", [1, 1], data=[3.7]), "got 3.7"),
    (InputTensor("F", "FP32", [1, 2], data=[float("nan"), 1.0]), "FP32 elements must be finite numbers"),
    (InputTensor("F", "FP32", [1, 2], data=[1e39, 1.0]), "FP32 elements must be finite numbers"),
    (InputTensor("F", "FP32", [1, 2], data=["1", 1.0]), "FP32 elements must be finite numbers"),
    (InputTensor("B", "BOOL", [1, 1], data=[1]), "BOOL elements must be true or false"),
    (InputTensor(names.BEAM_SIZE, "INT64", [1, 1], data=[1]), "has datatype INT64, expected INT32"),
    (InputTensor(names.BEAM_SIZE, "INT32", [1, 1], raw=b"\x01\x00"), "has 2 bytes, shape [1, 1] of INT32 needs 4"),
    (InputTensor(names.BEAM_SIZE, "INT32", [1, 1], data=[1, 2]), "holds 2 elements, shape [1, 1] needs 1"),
    (InputTensor(names.BEAM_SIZE, "INT32", [1, 2], data=[1, 2]), "has shape [1, 2], expected [-1, 1]"),
    (InputTensor(names.BEAM_SIZE, "INT32", [2**40, 1], data=[1]), "a dimension is over"),
    (InputTensor(names.BEAM_SIZE, "INT32", [9, 1], data=[1] * 9), "batch size 9 is outside 1..8"),
    (InputTensor(names.BEAM_SIZE, "INT32", [2, 1], data=[1, 1]), "inputs disagree on batch size: [1, 2]"),
    (InputTensor(names.BEAM_SIZE, "INT32", [1, 1]), "has no data"),
    (InputTensor("NOPE", "INT32", [1, 1], data=[1]), "unexpected input 'NOPE'"),
    (InputTensor(names.IMAGE, "BYTES", [1, 1], data=[1]), "given twice"),
])
def test_decode_inputs_refuses_what_the_config_does_not_allow(tensor, needle):
    with pytest.raises(RequestError, match=needle.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        decode_inputs(_config(), [_image(), tensor])


def test_decode_inputs_needs_the_required_inputs():
    with pytest.raises(RequestError, match="missing required input\\(s\\): IMAGE"):
        decode_inputs(_config(), [InputTensor(names.BEAM_SIZE, "INT32", [1, 1], data=[1])])
    with pytest.raises(RequestError, match="BYTES elements must be strings"):
        decode_inputs(_config(), [InputTensor(names.IMAGE, "BYTES", [1, 1], data=[3])])
