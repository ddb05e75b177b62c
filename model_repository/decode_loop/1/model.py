"""Triton Python backend (BLS): cross_kv [2L,H,P,Dh] -> CAPTION (TYPE_STRING [1]).

Runs the KV-cached decode loop by calling the `decoder` ONNX model one step at a time with
`pb_utils.InferenceRequest(...).exec()`. Requests in one `execute` call are batched
together (grouped by decoding parameters); a bad request gets its own error response.
A thin shell over `captioner.serving_core.DecodeLoop` and `captioner.decoding`, the same
greedy/beam functions the PyTorch path uses.
"""
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from captioner.names import BEAM_SIZE, CAPTION, CROSS_KV, DECODER, INPUT_IDS, LOGITS, MAX_TOKENS, PAST_KV, PRESENT_KV
from captioner.serving_core import DecodeLoop, params_for


def _run_decoder(input_ids, cross_kv, past_kv):
    request = pb_utils.InferenceRequest(
        model_name=DECODER,
        requested_output_names=[LOGITS, PRESENT_KV],
        inputs=[pb_utils.Tensor(INPUT_IDS, input_ids), pb_utils.Tensor(CROSS_KV, cross_kv),
                pb_utils.Tensor(PAST_KV, past_kv)],
    )
    response = request.exec()
    if response.has_error():
        raise RuntimeError(f"decoder: {response.error().message()}")
    return (pb_utils.get_output_tensor_by_name(response, LOGITS).as_numpy(),
            pb_utils.get_output_tensor_by_name(response, PRESENT_KV).as_numpy())


def _optional_int(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return None
    a = t.as_numpy().reshape(-1)
    return int(a[0]) if a.size else None


class TritonPythonModel:
    def initialize(self, args):
        self.loop = DecodeLoop.from_dir(os.path.join(args["model_repository"], args["model_version"]), _run_decoder)

    def execute(self, requests):
        items, errors = [], {}
        for i, request in enumerate(requests):
            try:
                cross = pb_utils.get_input_tensor_by_name(request, CROSS_KV).as_numpy()
                self.loop.check_cross_kv(cross)
                params = params_for(_optional_int(request, BEAM_SIZE), _optional_int(request, MAX_TOKENS),
                                    self.loop.s)
                items.append((i, cross, params))
            except Exception as e:  # noqa: BLE001
                errors[i] = e
        results = dict(zip([i for i, _, _ in items], self.loop.caption_requests([(c, p) for _, c, p in items])))
        responses = []
        for i in range(len(requests)):
            res = errors.get(i, results.get(i))
            if isinstance(res, Exception):
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(res).__name__}: {res}")))
            else:
                caps = np.array([c.encode() for c in res], dtype=np.object_).reshape(-1, 1)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(CAPTION, caps)]))
        return responses
