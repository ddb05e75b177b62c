"""A Python-based Triton backend named `onnxruntime`, for the tritonserver that runs in tests and
`make demo` (captioner.serving.triton_server): the nvidia-pytriton wheel bundles tritonserver with the
Python backend only, so a model with `backend: "onnxruntime"` (our `encoder` and `decoder`)
finds no `libtriton_onnxruntime.so`. Triton then looks for `<backend-directory>/onnxruntime/
model.py` and runs it through the Python backend ("Python-based backends": core
src/backend_model.cc, TritonModel::ResolveBackendConfigs / LocateBackendLibrary falling back to
the python backend when the backend folder holds model.py; python_backend README
"Python-based Backends"), so the exported repository stays byte-identical.

`captioner.serving.triton_server` copies this file to `<backend-directory>/onnxruntime/model.py`. It
honours what the config says: inputs and outputs by name (only the outputs a request asks
for), `max_batch_size` (> 0: every request carries the batch dimension and the requests of one
execution, as Triton's dynamic batcher gathered them, run as one batch and are split back; 0:
each request runs alone), the instance kind (KIND_GPU uses the CUDA provider on the instance's
device when onnxruntime has it). The session is built once, in `initialize`, over
`<model folder>/<version>/<default_model_filename or model.onnx>`.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        self.config = json.loads(args["model_config"])
        self.batched = int(self.config.get("max_batch_size", 0)) > 0
        self.inputs = [i["name"] for i in self.config["input"]]
        self.outputs = [o["name"] for o in self.config["output"]]
        path = os.path.join(args["model_repository"], args["model_version"],
                            self.config.get("default_model_filename") or "model.onnx")
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args.get("model_instance_device_id", 0))}))
        self.session = ort.InferenceSession(path, providers=providers)

    def _run(self, feeds: dict, names: list) -> dict:
        return dict(zip(names, self.session.run(names, feeds)))

    def execute(self, requests):
        feeds_per_request, wanted = [], []
        for request in requests:
            feeds_per_request.append({n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs})
            wanted.append(list(request.requested_output_names()) or self.outputs)
        names = [n for n in self.outputs if any(n in w for w in wanted)]
        try:
            if self.batched:
                sizes = np.cumsum([0] + [len(f[self.inputs[0]]) for f in feeds_per_request])
                out = self._run({n: np.concatenate([f[n] for f in feeds_per_request]) for n in self.inputs}, names)
                results = [{n: out[n][a:b] for n in names} for a, b in zip(sizes[:-1], sizes[1:])]
            else:
                results = [self._run(f, names) for f in feeds_per_request]
        except Exception as e:  # noqa: BLE001 - onnxruntime's refusal goes back to these requests
            err = pb_utils.TritonError(f"onnxruntime: {type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=err) for _ in requests]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(r[n])) for n in w])
                for r, w in zip(results, wanted)]
