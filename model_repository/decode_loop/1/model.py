"""Triton Python backend: cross_kv [2L,H,P,Dh] -> CAPTION (TYPE_STRING [1]).

`captioner export` copies this file to `decode_loop/<version>/model.py`. The whole generation
loop runs inside one `execute()`: `initialize` loads, once, an onnxruntime session over the
decoder graph shipped in this model's own version folder (`decoder.onnx`, with
`select_rows.onnx`), and every step runs in process through I/O binding (captioner.serving.onnx_runtime
.BoundDecoder): no BLS `exec()` per token (Triton users measure 2-13 ms each: server issues
#5174, #7413), the cross K/V copied to the device once per caption, the KV cache kept there.

Why the graph lives in this version folder: python_backend passes `args["model_repository"]`
= the *model's* folder (src/stub_launcher.cc: `model_repository_path_ = model_state->
RepositoryPath()`, handed to the stub's `initialize`), and for a cloud repository (S3) Triton
copies only that model's folder to local disk, so a sibling `decoder/` folder is not there to
read. Shipping the graph with the loop also keeps loop and graph of one version together.
`args["model_instance_device_id"]` picks the GPU of a KIND_GPU instance.

Why not onnxruntime's BeamSearch/GreedySearch contrib op (the whole loop in one graph): its
encoder-decoder mode validates the encoder subgraph's first input as `encoder_input_ids`
int32 [B, S] (onnxruntime contrib_ops/cpu/transformers/subgraph_t5_encoder.cc `Validate`), so
it cannot take pixel values or the cross K/V our `encoder` step produces; its Whisper mode
takes audio features with Whisper's own decoder conventions. It would also move the encoder
out of the ensemble and replace decoding.py's beam search (GNMT length penalty, n-gram
blocking), so captions would no longer equal the reference.

The request-level step (checks, BEAM_SIZE / MAX_TOKENS, batching, captions, per-request
errors) is `captioner.serving.core.caption_requests`, the same function `captioner serve` runs.
"""
import os

import triton_python_backend_utils as pb_utils

from captioner.core.names import BEAM_SIZE, CAPTION, CROSS_KV, MAX_TOKENS
from captioner.serving.core import DecodeLoop, caption_requests, error_code


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.loop = DecodeLoop.in_process(folder, device_id=int(args.get("model_instance_device_id", 0) or 0))

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
                # bad input -> INVALID_ARG (python_backend's default code would be INTERNAL)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                    f"{type(res).__name__}: {res}", getattr(pb_utils.TritonError, error_code(res)))))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(CAPTION, res[CAPTION])]))
        return responses
