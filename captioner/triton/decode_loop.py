"""Triton Python backend (BLS): cross_kv [2L,H,P,Dh] -> CAPTION (TYPE_STRING [1]).

`captioner export` copies this file to `decode_loop/<version>/model.py`. It runs the
KV-cached decode loop by calling the `decoder` ONNX model one step at a time with
`pb_utils.InferenceRequest(...).exec()`. The request-level step (checks, BEAM_SIZE /
MAX_TOKENS, batching, captions, per-request errors) is `captioner.serving_core.caption_requests`,
the same function `captioner serve` runs.

The decoder runs as KIND_GPU on the cluster, and Triton hands a BLS caller the callee's
outputs in the callee's memory: `as_numpy()` on a GPU tensor raises. The request therefore
asks for CPU memory (`preferred_memory`, python_backend README "Business Logic Scripting",
src/infer_request.h `PreferredMemory`). The decoder is not an ensemble step, so Triton does
not load it for us: the deploy loads it explicitly (captioner.triton_repo.LOAD_ORDER).
"""
import os

import triton_python_backend_utils as pb_utils

from captioner.names import BEAM_SIZE, CAPTION, CROSS_KV, DECODER, INPUT_IDS, LOGITS, MAX_TOKENS, PAST_KV, PRESENT_KV
from captioner.serving_core import DecodeLoop, caption_requests


class TritonPythonModel:
    def initialize(self, args):
        self.loop = DecodeLoop.from_dir(os.path.join(args["model_repository"], args["model_version"]), self._decoder)
        self.cpu = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)

    def _decoder(self, input_ids, cross_kv, past_kv):
        request = pb_utils.InferenceRequest(
            model_name=DECODER,
            model_version=self.loop.s.decoder_version,
            requested_output_names=[LOGITS, PRESENT_KV],
            inputs=[pb_utils.Tensor(INPUT_IDS, input_ids), pb_utils.Tensor(CROSS_KV, cross_kv),
                    pb_utils.Tensor(PAST_KV, past_kv)],
            preferred_memory=self.cpu,
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{DECODER}: {response.error().message()}")
        return (pb_utils.get_output_tensor_by_name(response, LOGITS).as_numpy(),
                pb_utils.get_output_tensor_by_name(response, PRESENT_KV).as_numpy())

    def execute(self, requests):
        tensors = []
        for request in requests:
            t = {}
            for name in (CROSS_KV, BEAM_SIZE, MAX_TOKENS):
                x = pb_utils.get_input_tensor_by_name(request, name)
                if x is not None:
                    t[name] = x.as_numpy()
            tensors.append(t)
        responses = []
        for res in caption_requests(self.loop, tensors):
            if isinstance(res, Exception):
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(res).__name__}: {res}")))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(CAPTION, res[CAPTION])]))
        return responses
