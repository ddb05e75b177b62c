"""`captioner` command line: thin adapters that parse arguments and call one function each."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

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


# ----------------------------------------------------------------------------- argument types
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


def _shard_mb(s: str):
    """argparse type of ingest --shard-mb: 'auto' or a number > 0."""
    if s.strip().lower() == "auto":
        return "auto"
    try:
        return float_range(0.0, lo_open=True)(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {s!r}") from None


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


def _decode_args(p: argparse.ArgumentParser) -> None:
    from captioner.serving.core import MAX_BEAM

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


# what `captioner serve` / Triton's decode loop takes per request (BEAM_SIZE, MAX_TOKENS); the rest is
# fixed in the repository's decode settings, so over --url these flags would be silently ignored
_URL_UNSUPPORTED = (("--sample", "sample", False), ("--temperature", "temperature", 1.0), ("--top-p", "top_p", 1.0),
                    ("--length-penalty", "length_penalty", 1.0), ("--no-repeat-ngram", "no_repeat_ngram", 0))


def _params(a):
    from captioner.core.decoding import DecodeParams

    strategy = "sample" if a.sample else "beam" if a.beam > 1 else "greedy"
    return DecodeParams(strategy=strategy, max_new_tokens=a.max_new_tokens, beam_size=a.beam,
                        length_penalty=a.length_penalty, no_repeat_ngram_size=a.no_repeat_ngram,
                        temperature=a.temperature, top_p=a.top_p)


# ----------------------------------------------------------------------------- commands
LAYOUT_NAMES = {"flickr30k": "Kaggle Flickr30k layout: results.csv + flickr30k_images/",
                "imagefolder": "image folder with a Hugging Face ImageFolder metadata.jsonl (file_name, text)",
                "csv": "captions.csv with an image,caption header + images/"}

def cmd_generate_data(a, _):
    from captioner.data.synthetic import generate

    out = generate(a.out, images=a.images, seed=a.seed, side=a.side, layout=a.layout)
    print(f"wrote {a.images} images and {a.images * 5} captions to {out} ({LAYOUT_NAMES[a.layout]})")


def cmd_train(a, overrides):
    from captioner.core.config import load_config
    from captioner.training.train import train

    cfg = load_config(a.config, overrides)
    from captioner.modeling.encoders import check_encoder

    check_encoder(cfg.model.encoder, cfg.model.pretrained, cfg.model.encoder_weights)  # before any data work
    res = train(cfg, resume=a.resume, progress=not a.no_progress, overwrite=a.overwrite)
    if res.best["value"] > float("-inf"):
        log.info("done: step %d, best %s %.4f at step %d; checkpoints in %s", res.step, res.best["metric"],
                 res.best["value"], res.best["step"], res.out_dir)


def cmd_evaluate(a, _):
    from captioner.training.evaluate import evaluate

    r = evaluate(a.checkpoint, split=a.split, out_dir=a.out, data_source=a.data, params=_params(a),
                 max_images=a.max_images, meteor=not a.no_meteor)
    print(json.dumps(r["metrics"], indent=2))
    print(f"wrote {r['out_dir']}/metrics.json and samples.html")


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


def cmd_report(a, _):
    from captioner.training.report import write_report

    path, _m = write_report(a.run, a.out, a.samples)
    print(path)


def cmd_caption(a, _):
    from captioner.core.errors import UserError
    from captioner.cli.image_files import expand_image_args

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
    import numpy as np

    from captioner.modeling.checkpoint import load_checkpoint
    from captioner.modeling.inference import caption_arrays
    from captioner.core.preprocess import ImageError, preprocess_path

    ck = load_checkpoint(a.checkpoint)
    params = _params(a)
    a.max_new_tokens = params.max_new_tokens = params.max_new_tokens or ck.model.cfg.max_new_tokens
    out = _CaptionOutput(a.output, _caption_settings(a, str(ck.path), params.strategy))
    try:
        for i in range(0, len(a.images), 64):  # a chunk at a time: bounded memory for thousands of images
            good, arrays = [], []
            for p in a.images[i:i + 64]:
                try:
                    arrays.append(preprocess_path(p, ck.preprocess))
                    good.append(p)
                except ImageError as e:
                    out.add(p, None, str(e))
            if arrays:
                for p, c in zip(good, caption_arrays(ck.model, ck.tokenizer, np.stack(arrays), params)):
                    out.add(p, c)
    except BaseException:
        out.close(interrupted=True)
        raise
    out.close()


def cmd_export(a, _):
    from captioner.export.exporter import export

    r = export(a.checkpoint, a.out, device=a.device, quantize=a.quantize, verify=not a.no_verify,
               parity_images=a.parity_images, optimize=not a.no_optimize, force=a.force,
               decoder_dtype=a.decoder_dtype)
    if "parity" in r:
        p = r["parity"]
        print(f"parity: encoder max|diff| {p['encoder_max_abs_diff']:.2e}, per-step logits max|diff| "
              f"{p['logits_max_abs_diff']:.2e}, decode loop ({r['decoder_dtype']}, cache {r['kv_cache']}) log-probs "
              f"max|diff| {p['loop_logprobs_max_abs_diff']:.2e}, greedy captions equal "
              f"{p['captions_equal']}/{p['images']}")
    for kind in ("int8", "int4"):
        if f"parity_{kind}" in r:
            q = r[f"parity_{kind}"]
            print(f"{kind} parity: logits max|diff| {q['logits_max_abs_diff']:.3f}, decode loop log-probs max|diff| "
                  f"{q['loop_logprobs_max_abs_diff']:.3f}, greedy captions equal {q['captions_equal']}/{q['images']}")
    print(f"wrote Triton model repository {a.out}")


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
    from captioner.serving.client import TLS, grpc_target
    from captioner.web.gateway import run

    from captioner.serving.client import check_reachable
    from captioner.core.errors import UnreachableError

    a.url = grpc_target(a.url)
    tls = TLS(a.root_certificates, a.private_key, a.certificate_chain) if a.ssl else None
    try:  # the page may start before the model server (a pod next to Triton's): say so now, keep going
        check_reachable(a.url, tls, timeout=3)
    except UnreachableError as e:
        log.warning("%s; /readyz answers 503 until it is up (%s)", e, e.hint)
    run(a.url, host=a.host, port=a.port, model=a.model_name, max_images=a.max_images, max_body=a.max_body, tls=tls)


def _store(a, uri, create=False):
    from captioner.io.storage import open_store

    return open_store(uri, endpoint=a.s3_endpoint, secure=a.s3_secure, create=create)


def cmd_ingest(a, _):
    from captioner.data.ingest import IngestOptions, ingest

    o = IngestOptions(shard_mb=a.shard_mb, target_workers=a.target_workers, max_side=a.max_side, workers=a.workers,
                      val_fraction=a.val_fraction,
                      test_fraction=a.test_fraction, split_seed=a.split_seed, format=a.format, image_root=a.image_root,
                      strip_metadata=a.strip_metadata, progress=not a.no_progress)
    r = ingest(a.source, a.dest, o, store=_store(a, a.dest, create=True))
    print(json.dumps(r, indent=2))


def cmd_verify(a, _):
    from captioner.data.ingest import verify

    r = verify(a.dest, store=_store(a, a.dest), workers=a.workers)
    print(json.dumps(r, indent=2))
    if not r["ok"]:
        raise SystemExit(1)


def cmd_pipeline(a, overrides):
    from captioner.pipeline import runner as kp
    if a.pipeline_action == "compile":
        import os

        from captioner.core.deployment import TRAINER_IMAGE

        kp.compile_pipeline(a.out, train_in_pod=a.train_in_pod)
        image = os.environ.get("CAPTIONER_IMAGE")
        if not image:
            log.warning("every step runs the default image %s: CAPTIONER_IMAGE is not set; for your own build "
                        "(docker/trainer.Dockerfile) run `CAPTIONER_IMAGE=REGISTRY/captioner-trainer:TAG captioner "
                        "pipeline compile`", TRAINER_IMAGE)
        print(f"wrote {a.out}: every step runs {image or TRAINER_IMAGE} (upload it in the Kubeflow Pipelines UI)")
        return
    if a.val_fraction is None or a.test_fraction is None:  # the ingest step splits as the preset would
        from captioner.core.config import load_config

        d = load_config(a.config, list(overrides)).data
        a.val_fraction = d.val_fraction if a.val_fraction is None else a.val_fraction
        a.test_fraction = d.test_fraction if a.test_fraction is None else a.test_fraction
    common = dict(config=a.config, overrides=list(overrides), min_cider=a.min_cider, eval_max_images=a.eval_max_images,
                  val_fraction=a.val_fraction, test_fraction=a.test_fraction, shard_mb=a.shard_mb)
    if not a.host:
        from captioner.pipeline.local_run import run_pipeline_here

        from captioner.pipeline.local_run import print_outcome, write_summary

        wd = Path(a.workdir).resolve()
        if a.overwrite and (wd / "model").exists():
            import shutil

            log.info("--overwrite: removing the previous run's model %s", wd / "model")
            shutil.rmtree(wd / "model")
        args = kp.local_arguments(a.workdir, a.source, **common)
        print("running the pipeline here (kfp.local); steps as they finish:", flush=True)
        run_pipeline_here(args, wd / "pipeline_root", wd / "pipeline.log", verbose=a.verbose,
                          overwrite_hint=f"rerun with --overwrite to replace the model in {wd / 'model'}, or give "
                                         "a new --workdir")
        summary = write_summary(wd, wd / "pipeline_root", args)
        print_outcome(summary)
        print(f"pipeline finished; artefacts under {wd}")
        return
    import os

    _check_for_pods("pipeline run --host", a.config, {})
    if a.overwrite:
        from captioner.core.errors import UserError

        raise UserError("pipeline run --host: --overwrite is for local runs",
                        hint="on Kubeflow give a new --model-uri for a new training run")
    cluster = {k: v for k, v in dict(workers=a.workers, gpus_per_worker=a.gpus_per_worker, cloud=a.cloud,
                                     image=a.image, namespace=a.job_namespace, max_cost=a.max_cost,
                                     price_per_gpu_hour=a.price_per_gpu_hour).items() if v is not None}
    args = kp.host_arguments(a.source, a.data_uri, a.model_uri, a.repo_uri, a.serving_uri, **common,
                             export_device=a.export_device, triton_url=a.triton_url, nproc=a.nproc,
                             cluster_settings=cluster, deploy_target=a.deploy_target,
                             kserve_settings={"canary_percent": a.canary_percent})
    print(_submit(kp, a.host, args, namespace=a.namespace, existing_token=os.environ.get(a.token_env),
                  cookies=os.environ.get(a.cookies_env), ssl_ca_cert=a.ssl_ca_cert, train_in_pod=a.train_in_pod))


def _submit(kp, host: str, args: dict, **kw) -> str:
    """kp.run_host, with a refused/unresolvable/timed-out connection as one line and a hint."""
    import urllib3

    from captioner.core.errors import UnreachableError

    try:
        return kp.run_host(host, args, **kw)
    except (urllib3.exceptions.HTTPError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise UnreachableError(f"cannot reach Kubeflow Pipelines at {host}: {reason}",
                               hint="check --host (the ml-pipeline-ui / ml-pipeline endpoint, e.g. "
                                    "http://localhost:8080 after `kubectl port-forward -n kubeflow "
                                    "svc/ml-pipeline-ui 8080:80`) and that you are logged in") from e


def _check_for_pods(what: str, config: str, uris: dict) -> None:
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


def cmd_job(a, overrides):
    """`captioner job render`: the PyTorchJob or TrainJob the pipeline's train step would create."""
    import yaml

    from captioner.core.config import load_config
    from captioner.cluster.jobs import training_job
    from captioner.cluster.jobspec import job_name

    _check_for_pods("job render", a.config, {"--data": a.data, "--model-uri": a.model_uri})
    load_config(a.config, [f"--data.source={a.data}", *overrides])  # fail here, not in the pods
    job = training_job(a.name or job_name("captioner-train", a.model_uri), a.config,
                       [f"--data.source={a.data}", *overrides], a.model_uri, workers=a.nodes,
                       gpus_per_worker=a.gpus_per_node, image=a.image, namespace=a.namespace, cloud=a.cloud,
                       min_workers=a.min_nodes, max_workers=a.max_nodes, api=a.api)
    sys.stdout.write(yaml.safe_dump(job, sort_keys=False))


def cmd_demo(a, _):
    from captioner.demo import run_demo

    run_demo(a.workdir, images=a.images, epochs=a.epochs, min_cider=a.min_cider, serve=a.serve)


def cmd_bench(a, _):
    import importlib

    mod = {"train": "captioner.bench.train_throughput", "latency": "captioner.bench.caption_latency",
           "ingest": "captioner.bench.ingest_throughput", "serve": "captioner.bench.serve_throughput",
           "quality": "captioner.bench.quantized_quality", "int8": "captioner.bench.quantized_quality"}[a.what]
    prog, sys.argv[0] = sys.argv[0], f"captioner bench {a.what}"  # the usage line of parsers without a prog
    try:
        importlib.import_module(mod).main(a.rest)
    finally:
        sys.argv[0] = prog


COMMANDS = {}
from captioner.core.deployment import JOB_NAMESPACE, NODE_POOLS, TRAINER_IMAGE  # noqa: E402 - defaults in --help


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


def _lazy_epilog(parser: argparse.ArgumentParser, make) -> None:
    """Compute `parser`'s epilog when its help is printed, not when the CLI starts: the serving
    commands must not import torch (tests/serving/test_lean_serving.py)."""
    plain = parser.format_help

    def format_help() -> str:
        if parser.epilog is None:
            parser.epilog = make()
        return plain()

    parser.format_help = format_help


def _preset_summary(text: str) -> str:
    """A preset's leading comment up to the end of its first sentence (whole, never cut)."""
    import re

    words = []
    for ln in text.splitlines():
        if not ln.startswith("#"):
            break
        words.append(ln.lstrip("#").strip())
    joined = " ".join(w for w in words if w)
    m = re.search(r"^.*?\.(?=\s|$)", joined)
    return m.group(0) if m else joined


def _presets_and_config_keys() -> str:
    """`train --help` epilog: the presets and every config key, generated from the dataclasses."""
    import dataclasses
    import inspect

    try:
        from captioner.core.config import PRESET_DIR, ExperimentConfig
    except ImportError as e:  # the web gateway's image has no torch; `captioner web` must still start
        return f"(presets and config keys are listed where the training stack is installed: {e})"

    import textwrap

    lines = ["presets (--config NAME):"]
    for f in sorted(PRESET_DIR.glob("*.yaml")):
        lines += textwrap.wrap(_preset_summary(f.read_text()), 100, initial_indent=f"  {f.stem:<14} ",
                               subsequent_indent=" " * 17, break_on_hyphens=False)
    lines.append("")
    lines.append("config keys (--section.key=value; the preset or YAML sets some, the rest keep these defaults):")
    cfg = ExperimentConfig()
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        notes = _field_comments(inspect.getsource(type(obj)))
        lines.append(f"  {sec.name}:")
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            note = notes.get(f.name, "")
            lines.append(f"    {sec.name}.{f.name}={v!r}" + (f"  # {note}" if note else ""))
    return "\n".join(lines)


def _field_comments(src: str) -> dict[str, str]:
    """The comment above or beside each field of a dataclass's source, first sentence only."""
    import re

    out, pending = {}, []
    for ln in src.splitlines():
        t = ln.strip()
        if t.startswith("#"):
            pending.append(t.lstrip("# "))
            continue
        m = re.match(r"(\w+)\s*:\s*[^=]+=.*?(?:#\s*(.*))?$", t)
        if m and not t.startswith(("def ", "@", "class ")):
            text = " ".join(pending) or (m.group(2) or "")
            first = text.split(". ")[0].rstrip(".") if text else ""
            out[m.group(1)] = first if len(first) <= 100 else first[:99] + "…"
        pending = []
    return out


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

    s = sub.add_parser("generate-data", **common,
                       help="write a synthetic captioned image set (Kaggle Flickr30k layout, or --layout)")
    s.add_argument("out", help="output folder")
    s.add_argument("--images", type=POSITIVE, default=1000, help="number of images (5 captions each)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the generator")
    s.add_argument("--side", type=int_range(16, 4096), default=128, help="image side in pixels")
    s.add_argument("--layout", choices=sorted(LAYOUT_NAMES), default="flickr30k",
                   help="; ".join(f"{k}: {v}" for k, v in sorted(LAYOUT_NAMES.items())))
    s.set_defaults(fn=cmd_generate_data)

    s = sub.add_parser("train", **common, help="train (one process, or under torchrun for DDP)", description=(
        "Train from a config preset or YAML file plus --section.key=value overrides, e.g.\n"
        "  captioner train --config tiny-cpu --data.source=data/synth --train.out_dir=runs/x --train.epochs=5\n"
        "Several processes: torchrun --nproc_per_node=N -m captioner train ..."))
    _lazy_epilog(s, _presets_and_config_keys)  # built at `train --help` only: it imports the config (and torch)
    s.add_argument("--config", default="tiny-cpu", help="preset name (configs/*.yaml) or YAML path")
    s.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt_latest.pt, else from the model "
                   "store (--train.publish_uri); start fresh when neither has one")
    s.add_argument("--overwrite", action="store_true", help="replace a run already in OUT_DIR / the model store "
                   "(without --resume or --overwrite such a run is refused and left untouched)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_train, overrides_ok=True)

    s = sub.add_parser("evaluate", **common, help="caption a split and report BLEU/METEOR/ROUGE-L/CIDEr-D")
    s.add_argument("checkpoint", help="checkpoint file or run folder (uses ckpt_best.pt)")
    s.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to caption")
    s.add_argument("--data", default=None, help="data source (default: the one in the checkpoint's config)")
    s.add_argument("--out", default=None, help="output folder (default: RUN/eval_SPLIT for greedy decoding of all images; "
                        "other settings add them to the name, e.g. RUN/eval_test_beam3)")
    s.add_argument("--max-images", type=COUNT_OR_ALL, default=0, help="evaluate at most this many images (0 = all)")
    s.add_argument("--no-meteor", action="store_true", help="skip METEOR (Java) even where Java exists")
    _decode_args(s)
    s.set_defaults(fn=cmd_evaluate)

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
    g = s.add_argument_group("TLS (with --url; Triton --grpc-use-ssl / --grpc-use-ssl-mutual)")
    g.add_argument("--ssl", action="store_true", help="connect over TLS (default: plaintext)")
    g.add_argument("--root-certificates", metavar="PEM", help="CA to verify the server (default: system roots)")
    g.add_argument("--private-key", metavar="PEM", help="client key, for servers that require client certificates")
    g.add_argument("--certificate-chain", metavar="PEM", help="client certificate chain (with --private-key)")
    _decode_args(s)
    s.set_defaults(fn=cmd_caption)

    s = sub.add_parser("export", **common,
                       help="checkpoint -> Triton model repository (ONNX + Python backend + ensemble)",
                       description="Export encoder and decoder (with past key/values) to ONNX, write the Triton "
                                   "repository and verify onnxruntime against PyTorch (fails loudly on mismatch).")
    s.add_argument("checkpoint", help="checkpoint file or run folder")
    s.add_argument("--out", required=True,
                   help="repository folder: new, empty, or one written earlier by export (replaced atomically)")
    s.add_argument("--force", action="store_true",
                   help="replace --out even if it holds other files (they are deleted)")
    s.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                   help="instance kind in the ONNX models' configs (KIND_GPU for the cluster, KIND_CPU locally)")
    s.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="int8: onnxruntime dynamic int8 (every graph, per-channel weights); int4: the decode loop's "
                        "step graph 4-bit weight-only (MatMulNBits, block 32), the encoder int8")
    s.add_argument("--decoder-dtype", choices=["float32", "float16"], default="float32",
                   help="the decode loop's step graph: float16 (for GPUs) halves its bytes per step and keeps "
                        "the KV cache in place on the GPU too (GroupQueryAttention has CUDA kernels for fp16 "
                        "only); its captions may differ from PyTorch's at near-ties (reported)")
    s.add_argument("--no-verify", action="store_true", help="skip the onnxruntime/PyTorch parity check")
    s.add_argument("--no-optimize", action="store_true", help="skip onnxruntime's transformer graph fusions")
    s.add_argument("--parity-images", type=POSITIVE, default=8, help="images in the parity check")
    s.set_defaults(fn=cmd_export)

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
    # issue 11: Triton's other two ports (tritonserver --http-port / --metrics-port), off unless given
    s.add_argument("--http-port", type=PORT, default=None, metavar="PORT",
                   help="also serve Triton's HTTP/REST API (KServe v2 + binary data) on PORT (default: off; "
                        "Triton's is 8000)")
    s.add_argument("--metrics-port", type=PORT, default=None, metavar="PORT",
                   help="also serve Prometheus /metrics with Triton's nv_inference_* names on PORT (default: off; "
                        "Triton's is 8002)")
    s.set_defaults(fn=cmd_serve)

    # issue 11: the web gateway in front of Triton / `captioner serve`
    s = sub.add_parser("web", **common,
                       help="web page + JSON API for captioning, in front of Triton or `captioner serve`")
    s.add_argument("--url", required=True, help="HOST:PORT of the model server's gRPC port (as `caption --url`)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    s.add_argument("--port", type=PORT, default=8080, help="port to listen on")
    s.add_argument("--model-name", default="captioner", help="served model name")
    s.add_argument("--max-images", type=int_range(1, 256), default=16, help="images per request (more: 400)")
    s.add_argument("--max-body", type=POSITIVE, default=32 << 20, help="request size limit in bytes (more: 413)")
    g = s.add_argument_group("TLS to the model server (Triton --grpc-use-ssl / --grpc-use-ssl-mutual)")
    g.add_argument("--ssl", action="store_true", help="connect over TLS (default: plaintext)")
    g.add_argument("--root-certificates", metavar="PEM", help="CA to verify the server (default: system roots)")
    g.add_argument("--private-key", metavar="PEM", help="client key, for servers that require client certificates")
    g.add_argument("--certificate-chain", metavar="PEM", help="client certificate chain (with --private-key)")
    s.set_defaults(fn=cmd_web)

    def s3_flags(sp):
        g = sp.add_argument_group("object storage (s3:// URIs)")
        g.add_argument("--s3-endpoint", default=None,
                       help="host:port or http(s)://host:port (default: $CAPTIONER_S3_ENDPOINT); keys come from "
                            "$AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY")
        g.add_argument("--s3-secure", action="store_true", default=None, help="use TLS (default: $CAPTIONER_S3_SECURE)")

    s = sub.add_parser("ingest", **common, help="validate, shard and upload a captioned image set to a folder or s3://",
                       description="SOURCE: a Kaggle Flickr30k folder or zip (results.csv + flickr30k_images/), an "
                                   "image folder with a metadata.jsonl (file_name, text: Hugging Face ImageFolder), "
                                   "a CSV with an image,caption header, a Karpathy split JSON or a COCO captions JSON "
                                   "(images next to it or --image-root). "
                                   "DEST: a folder or s3://bucket/prefix. Resumable: rerun after an interruption.")
    s.add_argument("source", help="captioned images: folder, zip, captions CSV/JSON or metadata.jsonl")
    s.add_argument("dest", help="a folder or s3://bucket/prefix")
    s.add_argument("--shard-mb", type=_shard_mb, default=64.0,
                   help="target shard size in MB, or 'auto' with --target-workers: shards small enough that every "
                        "reader of the training cluster gets whole shards (each shard read once per epoch)")
    s.add_argument("--target-workers", type=int_range(1, 1_000_000), default=0, metavar="N",
                   help="with --shard-mb auto: readers of the cluster that will train on this data, i.e. ranks x "
                        "DataLoader workers per rank (e.g. 8 GPUs x --data.num_workers 4 = 32)")
    s.add_argument("--max-side", type=COUNT_OR_ALL, default=0,
                   help="resize images so the longer side is at most this (0 = keep)")
    s.add_argument("--workers", type=int_range(1, 256), default=8, help="parallel uploads / image checks")
    s.add_argument("--val-fraction", type=FRACTION, default=0.05, help="share of images held out for validation")
    s.add_argument("--test-fraction", type=FRACTION, default=0.05, help="share of images held out for testing")
    s.add_argument("--split-seed", type=int, default=0, help="seed of the image -> split hash")
    s.add_argument("--format", default="auto", choices=["auto", "flickr30k", "karpathy", "coco", "imagefolder", "csv"],
                   help="source layout (auto: detected from SOURCE)")
    s.add_argument("--image-root", default="", help="image folder for JSON sources")
    s.add_argument("--strip-metadata", action=argparse.BooleanOptionalAction, default=True,
                   help="drop EXIF (GPS, camera serials), XMP and comments from stored images, baking the EXIF "
                        "orientation into the pixels")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s3_flags(s)
    s.set_defaults(fn=cmd_ingest)

    s = sub.add_parser("verify", **common, help="re-check a dataset's manifest against the store (sizes and sha256)")
    s.add_argument("dest", help="a dataset written by `captioner ingest`: folder or s3://bucket/prefix")
    s.add_argument("--workers", type=int_range(1, 256), default=8, help="parallel checks")
    s3_flags(s)
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("pipeline", **common, help="compile the Kubeflow pipeline, or run it (here or on Kubeflow)",
                       description="compile: write the KFP v2 IR YAML for the Kubeflow Pipelines UI. run: run every "
                                   "step on this machine (kfp.local) or submit to Kubeflow Pipelines (--host).")
    psub = s.add_subparsers(dest="pipeline_cmd", required=True, metavar="{compile,run}")
    pc = psub.add_parser("compile", help="write the pipeline's KFP v2 IR YAML (upload it in the Kubeflow UI)", **common)
    pc.add_argument("out", nargs="?", default="captioner-pipeline.yaml", metavar="OUT.yaml",
                    help="output file (default: %(default)s)")
    pc.add_argument("--train-in-pod", action="store_true",
                    help="train inside the pipeline's own 1-GPU pod instead of launching a PyTorchJob")
    pc.set_defaults(fn=cmd_pipeline, pipeline_action="compile")
    pr = psub.add_parser("run", help="run the pipeline here (--local, the default) or on Kubeflow (--host URL)",
                         description="run --local: every step on this machine (kfp.local.SubprocessRunner). "
                                     "run --host URL: submit to Kubeflow Pipelines (every location an s3:// URI). "
                                     "Extra --section.key=value arguments become training overrides (see "
                                     "`captioner train --help`).", **common)
    pr.add_argument("--local", action="store_true", help="run here (the default when --host is not given)")
    pr.add_argument("--source", default=None, required=True,
                    help="dataset to ingest: a Flickr30k folder/zip or a captions JSON here; an s3:// URI with --host")
    pr.add_argument("--workdir", default="pipeline_out", help="local run: where data, model and repository go")
    pr.add_argument("--config", default="tiny-cpu", help="training preset name or YAML path")
    pr.add_argument("--min-cider", type=float_range(0.0), default=0.5, help="quality gate: minimum CIDEr-D to deploy")
    pr.add_argument("--eval-max-images", type=COUNT_OR_ALL, default=0,
                    help="evaluate at most this many images (0 = all)")
    pr.add_argument("--val-fraction", type=FRACTION, default=None,
                    help="share of images held out for validation at ingest (default: the --config preset's "
                         "data.val_fraction)")
    pr.add_argument("--test-fraction", type=FRACTION, default=None,
                    help="share of images held out for testing at ingest (default: the preset's data.test_fraction)")
    pr.add_argument("--shard-mb", type=float_range(0.0, lo_open=True), default=64.0, help="ingest shard size in MB")
    pr.add_argument("--overwrite", action="store_true",
                    help="local run: replace the model an earlier run left in WORKDIR/model (else that run's "
                         "checkpoints are kept and this run stops at its train step)")
    g = pr.add_argument_group("with --host (Kubeflow Pipelines)")
    g.add_argument("--host", default=None,
                   help="Kubeflow Pipelines endpoint to submit to, e.g. https://kubeflow.example.com/pipeline")
    g.add_argument("--namespace", default=None, help="multi-user Kubeflow: your profile namespace")
    g.add_argument("--token-env", default="KF_PIPELINES_TOKEN", metavar="VAR",
                   help="environment variable holding a bearer token for the endpoint")
    g.add_argument("--cookies-env", default="KF_PIPELINES_COOKIES", metavar="VAR",
                   help="environment variable holding the session cookie, e.g. authservice_session=...")
    g.add_argument("--ssl-ca-cert", default=None, help="CA bundle for an endpoint with a private certificate")
    for k, what in (("data-uri", "the ingested dataset"), ("model-uri", "the training run"),
                    ("repo-uri", "the exported Triton repository"), ("serving-uri", "the repository Triton serves")):
        g.add_argument(f"--{k}", default=None, metavar="S3_URI", help=f"s3:// URI for {what} (required with --host)")
    g.add_argument("--export-device", choices=["gpu", "cpu"], default="gpu",
                   help="Triton instance kind in the exported configs; cpu for a CPU-only cluster (kind overlay)")
    g.add_argument("--triton-url", default="", help="HOST:PORT of Triton's gRPC endpoint for the deploy step's reload "
                   "(on the cluster the headless triton-replicas.captioner.svc.cluster.local:8001: "
                   "every replica loads)")
    g.add_argument("--train-in-pod", action="store_true",
                   help="train inside the pipeline's own 1-GPU pod instead of launching a PyTorchJob")
    g.add_argument("--nproc", type=POSITIVE, default=1, help="with --train-in-pod: processes (GPUs) in the train pod")
    g.add_argument("--workers", type=POSITIVE, default=None, help="PyTorchJob worker nodes (default 2)")
    g.add_argument("--gpus-per-worker", type=COUNT_OR_ALL, default=None, help="GPUs per worker node (default 8)")
    g.add_argument("--cloud", choices=list(NODE_POOLS), default=None, help="node pool (default gke)")
    g.add_argument("--image", default=None, help="trainer image for the PyTorchJob (default: $CAPTIONER_IMAGE or "
                                                 "the released trainer image)")
    g.add_argument("--job-namespace", default=None, help="namespace of the PyTorchJob (default captioner)")
    g.add_argument("--max-cost", type=float_range(0.0), default=None, help="cost guard limit in $ (default 500)")
    g.add_argument("--price-per-gpu-hour", type=float_range(0.0), default=None,
                   help="for the cost guard (default 3.0)")
    # Kubeflow-native APIs; the training API itself is the override --train.api=pytorchjob|trainjob|auto
    g.add_argument("--deploy-target", choices=["triton", "kserve"], default="triton",
                   help="triton: load the new version on the Triton Deployment (k8s/base); kserve: roll it out on the "
                        "KServe v0.19 InferenceService (k8s/overlays/kserve) as a canary, live-check, promote or roll "
                        "back")
    g.add_argument("--canary-percent", type=int_range(1, 99), default=10,
                   help="with --deploy-target kserve: canaryTrafficPercent of the new version before promotion")
    pr.set_defaults(fn=cmd_pipeline, pipeline_action="run", overrides_ok=True)

    s = sub.add_parser("job", **common, help="render the training PyTorchJob for kubectl (no Kubeflow Pipelines needed)",
                       description="job render: print the PyTorchJob (Kubeflow Training Operator v1.9) that the "
                                   "pipeline's train step would create, e.g. `kubectl create -f <(captioner job render "
                                   "--config vit-b16-a100 --nodes 2 --gpus-per-node 8 --data s3://datasets/flickr30k/v1 "
                                   "--model-uri s3://models/runs/r1)`. Extra --section.key=value arguments become "
                                   "training overrides.")
    jsub = s.add_subparsers(dest="job_cmd", required=True, metavar="{render}")
    jr = jsub.add_parser("render", help="print the PyTorchJob or TrainJob YAML", **common)
    jr.add_argument("--config", required=True, help="training preset or YAML inside the image")
    jr.add_argument("--nodes", type=POSITIVE, required=True, help="worker nodes (pods)")
    jr.add_argument("--gpus-per-node", type=COUNT_OR_ALL, required=True,
                    help="GPUs per node = processes per node (0 = CPU)")
    jr.add_argument("--data", required=True, help="dataset written by `captioner ingest` (s3:// URI)")
    jr.add_argument("--model-uri", required=True, help="model store for checkpoints (s3:// URI); restarts resume here")
    jr.add_argument("--image", default=TRAINER_IMAGE, help="trainer image")
    jr.add_argument("--name", default=None, help="job name (default: derived from --model-uri)")
    jr.add_argument("--namespace", default=JOB_NAMESPACE, help="namespace of the job")
    jr.add_argument("--cloud", choices=list(NODE_POOLS), default="gke", help="node pool")
    jr.add_argument("--min-nodes", type=POSITIVE, default=None, help="elastic: fewest nodes to run with (default: --nodes)")
    jr.add_argument("--max-nodes", type=POSITIVE, default=None, help="elastic: most nodes (default: --nodes)")
    jr.add_argument("--api", choices=["pytorchjob", "trainjob"], default="pytorchjob",
                    help="pytorchjob: kubeflow.org/v1 PyTorchJob (Training Operator v1.9); trainjob: "
                         "trainer.kubeflow.org/v1alpha1 TrainJob on the torch-distributed runtime (Trainer v2.3, "
                         "no elastic range)")
    jr.set_defaults(fn=cmd_job, overrides_ok=True)

    s = sub.add_parser("report", **common, help="write a training run's HTML report (curves, numbers, config, data, "
                                                "worst samples) and print its path",
                       description="One self-contained HTML page for a run trained by `captioner train`: its "
                                   "TensorBoard curves as images, the throughput and cost numbers, config, data "
                                   "summary and the worst captions of its evaluation (eval_*/samples.html).")
    s.add_argument("run", help="run folder, a checkpoint in it, or the run's model store URI (s3://bucket/prefix)")
    s.add_argument("--out", default=None, help="where to write the HTML (default RUN/report.html; for s3:// "
                                               "./NAME-report.html)")
    s.add_argument("--samples", default=None, help="an evaluation's samples.html (default RUN/eval_*/samples.html)")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("demo", **common, help="the main job end to end on generated data (what `make demo` runs)")
    s.add_argument("--workdir", default="demo_out", help="where the generated data, run and repository go")
    s.add_argument("--images", type=int_range(50), default=1500, help="generated images")
    s.add_argument("--epochs", type=POSITIVE, default=8, help="training epochs")
    s.add_argument("--min-cider", type=float_range(0.0), default=1.0, help="quality gate for the deploy step")
    s.add_argument("--serve", action="store_true",
                   help="then keep `captioner serve` and `captioner web` running on the demo's model until Ctrl-C")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("bench", **common, help="benchmarks (print side-by-side measurements)")
    s.add_argument("what", choices=["train", "latency", "ingest", "serve", "quality", "int8"],
                   metavar="{train,latency,ingest,serve,quality}",
                   help="train: encode-once vs per-pair throughput; latency: caption latency/throughput of the "
                        "no-cache baseline, PyTorch+KV cache, onnxruntime fp32/int8/int4 (served path), HF generate, "
                        "and each served path's memory roofline; "
                        "ingest: S3 ingest and loader speed; serve: images/s and p50/p99 at concurrency 1, 8, 32 "
                        "through tritonclient against `captioner serve`, as a share of the encoder-bound ceiling; "
                        "quality (alias int8): int8 and int4 vs fp32 CIDEr-D and caption agreement on a run's "
                        "held-out test split")
    s.add_argument("rest", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="passed to the benchmark (try `captioner bench latency --help`)")
    s.set_defaults(fn=cmd_bench)
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
