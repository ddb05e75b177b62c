"""What several command modules share: argparse types that refuse a bad value with the accepted
range, the decoding flags of `evaluate` and `caption`, the TLS flags of `caption --url` and
`web`, and the check that what a cluster pod reads exists inside the cluster."""
from __future__ import annotations

import argparse


def int_range(lo: int, hi: int | None = None):
    """argparse type: an integer in [lo, hi]; anything else is refused with the accepted range."""
    want = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {v}")
        return v

    parse.__name__ = want
    return parse


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite number in the interval; (lo, hi) open where asked."""
    lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
    want = (f"a number in {lb}{lo}, {hi}{rb}" if lo is not None and hi is not None else
            f"a number {'>' if lo_open else '>='} {lo}" if lo is not None else "a number")

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r}") from None
        bad = (v != v or v in (float("inf"), float("-inf"))
               or (lo is not None and (v < lo or (lo_open and v == lo)))
               or (hi is not None and (v > hi or (hi_open and v == hi))))
        if bad:
            raise argparse.ArgumentTypeError(f"expected {want}, got {s}")
        return v

    parse.__name__ = want
    return parse


POSITIVE = int_range(1)
COUNT_OR_ALL = int_range(0)  # 0 means "all" / "off"
FRACTION = float_range(0.0, 1.0, lo_open=True, hi_open=True)
PORT = int_range(1, 65535)


def tls_flags(p: argparse.ArgumentParser, title: str) -> None:
    """--ssl and the PEM files of a gRPC connection over TLS (Triton --grpc-use-ssl / --grpc-use-ssl-mutual)."""
    g = p.add_argument_group(title)
    g.add_argument("--ssl", action="store_true", help="connect over TLS (default: plaintext)")
    g.add_argument("--root-certificates", metavar="PEM", help="CA to verify the server (default: system roots)")
    g.add_argument("--private-key", metavar="PEM", help="client key, for servers that require client certificates")
    g.add_argument("--certificate-chain", metavar="PEM", help="client certificate chain (with --private-key)")


def decode_args(p: argparse.ArgumentParser) -> None:
    from captioner.core.limits import MAX_BEAM

    g = p.add_argument_group("decoding")
    g.add_argument("--beam", type=int_range(1, MAX_BEAM), default=1, help="beam size (1 = greedy)")
    g.add_argument("--length-penalty", type=float_range(0.0), default=1.0,
                   help="beam length penalty alpha (0 = raw log-probability)")
    g.add_argument("--no-repeat-ngram", type=COUNT_OR_ALL, default=0,
                   help="block repeated n-grams of this size (0 = off)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy/beam")
    g.add_argument("--temperature", type=float_range(0.0, lo_open=True), default=1.0,
                   help="sampling temperature (with --sample)")
    g.add_argument("--top-p", type=float_range(0.0, 1.0, lo_open=True), default=1.0,
                   help="nucleus sampling: keep the smallest token set with this much probability (with --sample)")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=None,
                   help="longest caption in tokens (default: the model's limit, model.max_len - 2)")


def decode_params(a):
    from captioner.core.decoding import DecodeParams

    strategy = "sample" if a.sample else "beam" if a.beam > 1 else "greedy"
    return DecodeParams(strategy=strategy, max_new_tokens=a.max_new_tokens, beam_size=a.beam,
                        length_penalty=a.length_penalty, no_repeat_ngram_size=a.no_repeat_ngram,
                        temperature=a.temperature, top_p=a.top_p)


def check_for_pods(what: str, config: str, uris: dict) -> None:
    """What a pod will read must exist inside the cluster: a preset packaged in the trainer
    image, and s3:// locations (a path on this machine is not there)."""
    from captioner.core.config import PRESET_DIR
    from captioner.core.errors import UserError
    from captioner.io.storage import is_s3

    for flag, uri in uris.items():
        if not is_s3(uri):
            raise UserError(f"{what}: {flag} {uri!r} is a path on this machine, which the training pods cannot see",
                            hint=f"give an s3://bucket/prefix URI for {flag} (upload a dataset with `captioner ingest "
                                 "SOURCE s3://bucket/prefix`)")
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    if config not in presets:
        raise UserError(f"{what}: --config {config!r} is not a preset packaged in the trainer image (the pods read it "
                        "there, not from this machine)",
                        hint=f"use a preset ({', '.join(presets)}) and give your changes as --section.key=value "
                             "overrides, or build an image that holds your YAML at that path")
