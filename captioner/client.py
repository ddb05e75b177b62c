"""tritonclient gRPC client: works unchanged against Triton and `captioner serve`."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from captioner.names import BEAM_SIZE, CAPTION, ENSEMBLE, IMAGE, MAX_TOKENS

_local = threading.local()


def _client(url: str):
    import tritonclient.grpc as grpcclient

    c = getattr(_local, "clients", {}).get(url)
    if c is None:
        c = grpcclient.InferenceServerClient(url=url)
        _local.__dict__.setdefault("clients", {})[url] = c
    return c


def caption_bytes(url: str, images: list[bytes], beam: int = 1, max_tokens: int | None = None,
                  model: str = ENSEMBLE, timeout: float | None = 60.0) -> list[str]:
    """One request for a batch of encoded images -> their captions."""
    import tritonclient.grpc as grpcclient

    arr = np.array(images, dtype=np.object_).reshape(-1, 1)
    inputs = [grpcclient.InferInput(IMAGE, list(arr.shape), "BYTES")]
    inputs[0].set_data_from_numpy(arr)
    if beam != 1:
        b = np.full((len(images), 1), beam, dtype=np.int32)
        inputs.append(grpcclient.InferInput(BEAM_SIZE, list(b.shape), "INT32"))
        inputs[-1].set_data_from_numpy(b)
    if max_tokens:
        m = np.full((len(images), 1), max_tokens, dtype=np.int32)
        inputs.append(grpcclient.InferInput(MAX_TOKENS, list(m.shape), "INT32"))
        inputs[-1].set_data_from_numpy(m)
    res = _client(url).infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(CAPTION)],
                             client_timeout=timeout)
    return [c.decode() for c in res.as_numpy(CAPTION).reshape(-1)]


def caption_files(url: str, paths: list[str], beam: int = 1, concurrency: int = 4,
                  model: str = ENSEMBLE, max_tokens: int | None = None) -> Iterator[tuple[str, str]]:
    """Caption files with `concurrency` requests in flight; yields (path, caption) in input
    order, or (path, 'ERROR: ...') for an image the server refused."""
    from tritonclient.utils import InferenceServerException

    def one(p: str) -> str:
        try:
            return caption_bytes(url, [Path(p).read_bytes()], beam=beam, max_tokens=max_tokens, model=model)[0]
        except InferenceServerException as e:
            return f"ERROR: {e.message()}"
        except OSError as e:
            return f"ERROR: {e}"

    with ThreadPoolExecutor(max(1, concurrency)) as ex:
        yield from zip(paths, ex.map(one, paths))


def wait_ready(url: str, timeout: float = 60.0, model: str = ENSEMBLE) -> None:
    import time

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if _client(url).is_server_ready() and _client(url).is_model_ready(model):
                return
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"server at {url} not ready after {timeout:.0f}s ({last})")
