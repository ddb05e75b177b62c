"""Triton Python backend: IMAGE (encoded bytes, TYPE_STRING [1]) -> pixel_values FP32 [3,H,W].

`captioner export` copies this file to `preprocess/<version>/model.py`.
A thin shell: decoding and preprocessing are `captioner.serving.core.image_bytes_to_pixels`,
the same function training, export and the local server use; the numbers come from
preprocess.json, which `captioner export` writes from the encoder's timm data config.
"""
import os

import triton_python_backend_utils as pb_utils

from captioner.core.names import IMAGE, PIXEL_VALUES
from captioner.core.limits import REQUEST_PIXEL_BUDGET
from captioner.serving.core import check_pixel_budget, error_code, image_bytes_to_pixels, load_preprocess


class TritonPythonModel:
    def initialize(self, args):
        self.pre = load_preprocess(os.path.join(args["model_repository"], args["model_version"]))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images = pb_utils.get_input_tensor_by_name(request, IMAGE).as_numpy()
                check_pixel_budget(images, REQUEST_PIXEL_BUDGET)  # from the headers, before decoding anything
                pixels = image_bytes_to_pixels(images, self.pre)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(PIXEL_VALUES, pixels)]))
            except Exception as e:  # noqa: BLE001 - the error goes back to this request only
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                    f"{type(e).__name__}: {e}", getattr(pb_utils.TritonError, error_code(e)))))
        return responses
