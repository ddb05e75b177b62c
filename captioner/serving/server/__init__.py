"""`captioner serve`: the built-in server that speaks Triton's gRPC and HTTP/REST protocols and
its metrics, over the same request path as the Triton Python models."""
