"""tritonclient gRPC client: works unchanged against Triton and `captioner serve`, in
plaintext or over TLS (`TLS`: tritonclient.grpc.InferenceServerClient's ssl, root_certificates,
private_key, certificate_chain; Triton's server side is --grpc-use-ssl[-mutual])."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from captioner.core.names import BEAM_SIZE, CAPTION, ENSEMBLE, IMAGE, MAX_TOKENS

_local = threading.local()


@dataclass(frozen=True)
class TLS:
    """TLS for the gRPC channel. PEM files: root_certificates = CA to verify the server with
    (default: gRPC's system roots); private_key + certificate_chain = client certificate for
    servers that require one (Triton --grpc-use-ssl-mutual)."""
    root_certificates: str | None = None
    private_key: str | None = None
    certificate_chain: str | None = None

    def __post_init__(self):
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("TLS client authentication needs both --private-key and --certificate-chain")
        for what, f in (("--root-certificates", self.root_certificates), ("--private-key", self.private_key),
                        ("--certificate-chain", self.certificate_chain)):
            if f is not None and not Path(f).is_file():
                raise ValueError(f"{what} {f}: no such file")


def grpc_target(url: str, flag: str = "--url") -> str:
    """HOST:PORT of a gRPC endpoint as tritonclient.grpc takes it; a URL with a scheme is
    refused with the form to use (grpc:// is accepted and stripped)."""
    from captioner.core.errors import UserError

    u = url.strip()
    if u.startswith("grpc://"):
        u = u[len("grpc://"):]
    if "://" in u:
        host = u.split("://", 1)[1].split("/", 1)[0]
        raise UserError(f"{flag} {url!r}: expected HOST:PORT of the model server's gRPC endpoint, not a URL",
                        hint=f"drop the scheme, e.g. {flag} {host or '127.0.0.1:8001'} (Triton's gRPC port, "
                             "8001 by default; `captioner serve --grpc-port`), not its HTTP port")
    if not u or ":" not in u:
        raise UserError(f"{flag} {url!r}: expected HOST:PORT of the model server's gRPC endpoint",
                        hint=f"e.g. {flag} 127.0.0.1:8001")
    return u


def _why_unreachable(url: str, message: str) -> str:
    if "Failed parsing HTTP/2" in message:
        return (f"{url} answers, but not gRPC (an HTTP port?): give the gRPC port (Triton's 8001 by default; "
                "`captioner serve --grpc-port`)")
    return "start the server (`captioner serve REPO`, or port-forward the cluster's Triton) or check --url"


def check_reachable(url: str, tls: TLS | None = None, timeout: float = 10.0) -> None:
    """One liveness call before any work: a server that is down or a wrong port is one error
    line, not one per image."""
    from tritonclient.utils import InferenceServerException

    from captioner.core.errors import UnreachableError

    try:
        _client(url, tls).is_server_live(client_timeout=timeout)
    except InferenceServerException as e:
        msg = (e.message() or str(e)).splitlines()[0]
        raise UnreachableError(f"cannot reach the model server at {url}: {msg[:200]}",
                               hint=_why_unreachable(url, msg)) from None


def _client(url: str, tls: TLS | None = None):
    import tritonclient.grpc as grpcclient

    c = getattr(_local, "clients", {}).get((url, tls))
    if c is None:
        t = tls or TLS()
        c = grpcclient.InferenceServerClient(url=url, ssl=tls is not None, root_certificates=t.root_certificates,
                                             private_key=t.private_key, certificate_chain=t.certificate_chain)
        _local.__dict__.setdefault("clients", {})[(url, tls)] = c
    return c


def caption_bytes(url: str, images: list[bytes], beam: int = 1, max_tokens: int | None = None,
                  model: str = ENSEMBLE, timeout: float | None = 60.0, tls: TLS | None = None) -> list[str]:
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
    res = _client(url, tls).infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(CAPTION)],
                             client_timeout=timeout)
    return [c.decode() for c in res.as_numpy(CAPTION).reshape(-1)]


def caption_files(url: str, paths: list[str], beam: int = 1, concurrency: int = 4,
                  model: str = ENSEMBLE, tls: TLS | None = None,
                  max_tokens: int | None = None) -> Iterator[tuple[str, str]]:
    """Caption files with `concurrency` requests in flight; yields (path, caption) in input
    order, or (path, 'ERROR: ...') for an image the server refused."""
    from tritonclient.utils import InferenceServerException

    def one(p: str) -> str:
        try:
            return caption_bytes(url, [Path(p).read_bytes()], beam=beam, max_tokens=max_tokens, model=model,
                                 tls=tls)[0]
        except InferenceServerException as e:
            if e.status() == "StatusCode.UNAVAILABLE":  # the server went away: stop, don't repeat it per image
                from captioner.core.errors import UnreachableError

                raise UnreachableError(f"lost the model server at {url}: {e.message().splitlines()[0][:200]}",
                                       hint=_why_unreachable(url, e.message())) from None
            return f"ERROR: {e.message()}"
        except OSError as e:
            return f"ERROR: {e}"

    with ThreadPoolExecutor(max(1, concurrency)) as ex:
        yield from zip(paths, ex.map(one, paths))


def wait_ready(url: str, timeout: float = 60.0, model: str = ENSEMBLE, tls: TLS | None = None) -> None:
    """Wait until the server, and `model` unless it is "", is ready."""
    import time

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if _client(url, tls).is_server_ready() and (not model or _client(url, tls).is_model_ready(model)):
                return
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"server at {url} not ready after {timeout:.0f}s ({last})")
