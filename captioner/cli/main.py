"""`captioner` command line: the top-level parser, logging and dispatch. Each command group's
module in captioner/cli/ registers its subparsers (`add_<command>`) and holds the command
functions (`cmd_<command>`) that call the library: data (generate-data, ingest, verify), train
(train, evaluate, report), serve (caption, serve, web), export, pipeline, job, demo, bench;
args holds the argument types and checks they share."""
from __future__ import annotations

import argparse
import logging
import sys

from captioner.cli import bench, data, demo, export, job, pipeline, serve, train

log = logging.getLogger("captioner")


def _setup_logging(verbose: bool = False) -> None:
    import os

    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    tag = f" [rank{rank}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""  # only when there are ranks
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s{tag} %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not verbose:  # other libraries' internals: shown with -v
        import warnings

        for name in ("urllib3", "kfp", "onnxruntime", "onnx_model", "onnx_model_bert", "fusion_base",
                     "fusion_utils", "fusion_options", "fusion_attention", "fusion_skiplayernorm", "fusion_gelu"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # kfp_server_api's Configuration resets urllib3's level: a filter survives that
        logging.getLogger("urllib3.connectionpool").addFilter(lambda r: r.levelno >= logging.ERROR)
        warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; every option's help ends with its default (unless
    the default is "nothing": None/False/empty, or the help already says it)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if ("%(default)" in h or "default:" in h or not action.option_strings
                or d is None or d is False or d == "" or d == argparse.SUPPRESS):
            return h
        return f"{h} (default: %(default)s)"

    def _split_lines(self, text, width):  # never split "tiny-cpu" or a path at a hyphen
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        import textwrap

        return "\n".join(ln if ln.startswith(" ") else
                         textwrap.fill(ln, width, initial_indent=indent, subsequent_indent=indent)
                         for ln in text.splitlines())


def build_parser() -> argparse.ArgumentParser:
    from captioner import __version__
    p = argparse.ArgumentParser(prog="captioner", formatter_class=_Help, description=(
        "Image captioning platform: generate data, train a ViT + Transformer captioner, evaluate, "
        "export to ONNX/Triton, serve over Triton's gRPC protocol, ingest into object storage and run the "
        "Kubeflow pipeline. `captioner COMMAND --help` explains each command."))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks with errors")
    p.add_argument("--version", action="version", version=f"captioner {__version__}")
    verbose = argparse.ArgumentParser(add_help=False)  # -v also after the command; SUPPRESS keeps the top's value
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="debug logging, and tracebacks with errors")
    common = {"formatter_class": _Help, "parents": [verbose]}
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    # in the order `captioner --help` lists them
    data.add_generate_data(sub, common)
    train.add_train(sub, common)
    train.add_evaluate(sub, common)
    serve.add_caption(sub, common)
    export.add_export(sub, common)
    serve.add_serve(sub, common)
    serve.add_web(sub, common)
    data.add_ingest(sub, common)
    data.add_verify(sub, common)
    pipeline.add_pipeline(sub, common)
    job.add_job(sub, common)
    train.add_report(sub, common)
    demo.add_demo(sub, common)
    bench.add_bench(sub, common)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    if extra and not getattr(a, "overrides_ok", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(a.verbose)
    from captioner.core.errors import UserError
    from captioner.io.storage import StoreError  # (config.ConfigError is a ValueError)

    bad = [x for x in extra if not (x.startswith("--") and "=" in x)]
    if bad:
        parser.error(f"overrides must look like --section.key=value, got: {' '.join(bad)}")
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # log lines go above the progress bar, not through it
            a.fn(a, extra)
    except (UserError, FileNotFoundError, ValueError, StoreError) as e:
        _fail(e, a.verbose)


def _fail(e: BaseException, verbose: bool) -> None:
    """One line (and a hint) for a mistake the user can fix; the traceback only with -v."""
    if verbose:
        log.error("%s", e, exc_info=e)
    else:
        log.error("%s", e)
    hint = getattr(e, "hint", "")
    if hint:
        log.error("hint: %s", hint)
    raise SystemExit(getattr(e, "exit_code", 2)) from None


if __name__ == "__main__":
    main()
