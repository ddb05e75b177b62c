"""`captioner caption`, `serve` and `web`: captions from a checkpoint or a model server, the
local Triton stand-in, and the web gateway in front of it."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from captioner.cli.args import COUNT_OR_ALL, PORT, POSITIVE, decode_args, decode_params, int_range, tls_flags

log = logging.getLogger("captioner")

# what `captioner serve` / Triton's decode loop takes per request (BEAM_SIZE, MAX_TOKENS); the rest is
# fixed in the repository's decode settings, so over --url these flags would be silently ignored
_URL_UNSUPPORTED = (("--sample", "sample", False), ("--temperature", "temperature", 1.0), ("--top-p", "top_p", 1.0),
                    ("--length-penalty", "length_penalty", 1.0), ("--no-repeat-ngram", "no_repeat_ngram", 0))


class _CaptionOutput:
    """Where `caption` results go: tab-separated lines on stdout (failures on stderr), or with
    --output FILE one record per image (JSONL or CSV by the file's extension) holding the image,
    its caption or error, and the decoding settings; written as results arrive."""

    FIELDS = ("image", "caption", "error", "model", "strategy", "beam", "max_new_tokens", "length_penalty",
              "no_repeat_ngram", "temperature", "top_p")

    def __init__(self, path: str | None, settings: dict):
        self.path, self.settings, self.ok, self.failed = path, settings, 0, 0
        self.f = self.csv = None
        if path:
            kind = Path(path).suffix.lower()
            if kind not in (".jsonl", ".csv"):
                from captioner.core.errors import UserError

                raise UserError(f"caption --output {path}: unknown format {kind or '(no extension)'!r}",
                                hint="name the file .jsonl (one JSON object a line) or .csv")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.f = open(path, "w", newline="")
            if kind == ".csv":
                import csv

                self.csv = csv.DictWriter(self.f, fieldnames=self.FIELDS)
                self.csv.writeheader()

    def add(self, image: str, caption: str | None, error: str | None = None) -> None:
        if error is None:
            self.ok += 1
        else:
            self.failed += 1
        if self.f is None:
            if error is None:
                print(f"{image}\t{caption}")
            else:
                print(f"{image}\tERROR: {error}", file=sys.stderr)
            return
        row = {"image": str(image), "caption": caption, "error": error, **self.settings}
        if self.csv is not None:
            self.csv.writerow({k: "" if v is None else v for k, v in row.items()})
        else:
            self.f.write(json.dumps(row) + "\n")

    def close(self, interrupted: bool = False) -> None:
        if self.f is not None:
            self.f.close()
            log.info("wrote %d captions%s to %s", self.ok, f" and {self.failed} errors" if self.failed else "",
                     self.path)
        if self.failed and not interrupted:  # an exception on its way out says more than the exit status
            raise SystemExit(1)


def _caption_settings(a, model: str, strategy: str) -> dict:
    return {"model": model, "strategy": strategy, "beam": a.beam, "max_new_tokens": a.max_new_tokens,
            "length_penalty": a.length_penalty, "no_repeat_ngram": a.no_repeat_ngram,
            "temperature": a.temperature if a.sample else None, "top_p": a.top_p if a.sample else None}


def cmd_caption(a, _):
    from captioner.cli.image_files import expand_image_args
    from captioner.core.errors import UserError

    a.images, skipped = expand_image_args(a.images)
    if not a.images:
        raise UserError(f"caption: no image files among the arguments ({len(skipped)} other files skipped)",
                        hint="give image files (jpg, png, webp, ...) or folders that hold them")
    if a.url:
        from captioner.serving.client import TLS, caption_files, check_reachable, grpc_target

        a.url = grpc_target(a.url)
        ignored = [flag for flag, key, default in _URL_UNSUPPORTED if getattr(a, key) != default]
        if ignored:
            raise UserError(f"caption --url: the server decodes greedy or beam search only and cannot honour "
                            f"{', '.join(ignored)}",
                            hint="over --url give only --beam and --max-new-tokens; use -c CHECKPOINT for the other "
                                 "decoding options")
        certs = {k: getattr(a, k) for k in ("root_certificates", "private_key", "certificate_chain")}
        if any(certs.values()) and not a.ssl:
            raise UserError("caption: --root-certificates/--private-key/--certificate-chain need --ssl",
                            hint="add --ssl (Triton started with --grpc-use-ssl)")
        check_reachable(a.url, TLS(**certs) if a.ssl else None)
        out = _CaptionOutput(a.output, _caption_settings(a, f"{a.url}/{a.model_name}",
                                                         "beam" if a.beam > 1 else "greedy"))
        try:
            for path, cap in caption_files(a.url, a.images, beam=a.beam, concurrency=a.concurrency,
                                           model=a.model_name, tls=TLS(**certs) if a.ssl else None,
                                           max_tokens=a.max_new_tokens):
                if cap.startswith("ERROR:"):
                    out.add(path, None, cap[len("ERROR:"):].strip())
                else:
                    out.add(path, cap)
        except BaseException:
            out.close(interrupted=True)
            raise
        out.close()
        return
    from captioner.modeling.checkpoint import load_checkpoint
    from captioner.modeling.inference import caption_paths

    ck = load_checkpoint(a.checkpoint)
    params = decode_params(a)
    a.max_new_tokens = params.max_new_tokens = params.max_new_tokens or ck.model.cfg.max_new_tokens
    out = _CaptionOutput(a.output, _caption_settings(a, str(ck.path), params.strategy))
    try:
        for path, cap, err in caption_paths(ck.model, ck.tokenizer, ck.preprocess, a.images, params):
            out.add(path, cap, err)
    except BaseException:
        out.close(interrupted=True)
        raise
    out.close()


def _check_model_repository(repo: str, control: str) -> None:
    """A local folder with no MODEL/config.pbtxt at all is not a model repository (a dataset
    or run folder given by mistake): say that, not which of its subfolders lacks a config.
    An empty folder stays valid under explicit model control (models are loaded later)."""
    from captioner.core.errors import UserError
    from captioner.io.storage import is_s3

    p = Path(repo)
    if is_s3(repo) or not p.is_dir() or (control == "explicit" and not any(p.iterdir())):
        return
    if not any(p.glob("*/config.pbtxt")):
        raise UserError(f"serve: {repo} is not a model repository (no MODEL/config.pbtxt in it)",
                        hint="give the folder `captioner export RUN --out DIR` wrote, e.g. demo_out/run/serving or "
                             "demo_out/run/model_repository after `make demo`")


def cmd_serve(a, _):
    from captioner.serving.server.app import serve_forever

    _check_model_repository(a.repo, a.model_control_mode)

    from captioner.serving.triton_repo import RepositoryError

    try:
        serve_forever(a.repo, host=a.host, port=a.grpc_port, threads=a.threads, control=a.model_control_mode,
                      load=a.load_model, restricted=a.grpc_restricted_protocol, http_port=a.http_port,
                      metrics_port=a.metrics_port)
    except RepositoryError as e:
        raise SystemExit(f"serve: Triton would refuse this repository: {e}") from None


def cmd_web(a, _):
    from captioner.core.errors import UnreachableError
    from captioner.serving.client import TLS, check_reachable, grpc_target
    from captioner.web.gateway import run

    a.url = grpc_target(a.url)
    tls = TLS(a.root_certificates, a.private_key, a.certificate_chain) if a.ssl else None
    try:  # the page may start before the model server (a pod next to Triton's): say so now, keep going
        check_reachable(a.url, tls, timeout=3)
    except UnreachableError as e:
        log.warning("%s; /readyz answers 503 until it is up (%s)", e, e.hint)
    run(a.url, host=a.host, port=a.port, model=a.model_name, max_images=a.max_images, max_body=a.max_body, tls=tls)


def add_caption(sub, common: dict) -> None:
    s = sub.add_parser("caption", **common,
                       help="print one caption per image (PyTorch checkpoint or a Triton/gRPC server)")
    s.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files or folders of images; other files are skipped with a warning")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", "-c", default=None, help="checkpoint file or run folder (caption with PyTorch)")
    src.add_argument("--url", default=None, help="HOST:PORT of Triton or `captioner serve` (gRPC)")
    s.add_argument("--model-name", default="captioner", help="served model name (with --url)")
    s.add_argument("--concurrency", type=int_range(1, 256), default=4, help="requests in flight (with --url)")
    s.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="write one record per image (image, caption or error, model, decoding settings) to FILE: "
                        ".jsonl or .csv (default: tab-separated lines on stdout)")
    tls_flags(s, "TLS (with --url; Triton --grpc-use-ssl / --grpc-use-ssl-mutual)")
    decode_args(s)
    s.set_defaults(fn=cmd_caption)


def add_serve(sub, common: dict) -> None:
    s = sub.add_parser("serve", **common, help="serve a model repository over Triton's gRPC protocol (local stand-in)")
    s.add_argument("repo", help="model repository written by `captioner export`")
    s.add_argument("--grpc-port", type=PORT, default=8001, help="gRPC port")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--threads", type=COUNT_OR_ALL, default=0,
                   help="onnxruntime intra-op threads (0 = onnxruntime's choice)")
    s.add_argument("--model-control-mode", choices=["none", "explicit"], default="none",
                   help="as tritonserver: 'none' loads every model (and refuses a repository Triton would refuse); "
                        "'explicit' loads only --load-model names and what RepositoryModelLoad asks for")
    s.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="explicit mode: load NAME at start (repeat; dependencies first)")
    s.add_argument("--grpc-restricted-protocol", default=None, metavar="model-repository:KEY=VALUE",
                   help="as tritonserver: model load/unload/index calls must carry header KEY with VALUE")
    # Triton's other two ports (tritonserver --http-port / --metrics-port), off unless given
    s.add_argument("--http-port", type=PORT, default=None, metavar="PORT",
                   help="also serve Triton's HTTP/REST API (KServe v2 + binary data) on PORT (default: off; "
                        "Triton's is 8000)")
    s.add_argument("--metrics-port", type=PORT, default=None, metavar="PORT",
                   help="also serve Prometheus /metrics with Triton's nv_inference_* names on PORT (default: off; "
                        "Triton's is 8002)")
    s.set_defaults(fn=cmd_serve)


def add_web(sub, common: dict) -> None:
    s = sub.add_parser("web", **common,
                       help="web page + JSON API for captioning, in front of Triton or `captioner serve`")
    s.add_argument("--url", required=True, help="HOST:PORT of the model server's gRPC port (as `caption --url`)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    s.add_argument("--port", type=PORT, default=8080, help="port to listen on")
    s.add_argument("--model-name", default="captioner", help="served model name")
    s.add_argument("--max-images", type=int_range(1, 256), default=16, help="images per request (more: 400)")
    s.add_argument("--max-body", type=POSITIVE, default=32 << 20, help="request size limit in bytes (more: 413)")
    tls_flags(s, "TLS to the model server (Triton --grpc-use-ssl / --grpc-use-ssl-mutual)")
    s.set_defaults(fn=cmd_web)
