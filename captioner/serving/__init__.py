"""Serving without torch: the Triton repository's configs and rules, the request path shared by the
Triton Python models and `captioner serve`, onnxruntime sessions, the gRPC client, the real
tritonserver runner, and the built-in server (serving.server). Imports core and io only."""
