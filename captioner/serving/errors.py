"""The error of one bad request, shared by the Triton Python models (through
`captioner.serving.core`), the builtin server's wire codec and its data plane. Standard library
only: the web gateway decodes BYTES answers with the same codec and has no tokenizers."""
from __future__ import annotations


class RequestError(ValueError):
    """Bad input in one request; the message names the problem (-> INVALID_ARGUMENT)."""
