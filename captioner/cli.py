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
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam length penalty alpha")
    g.add_argument("--no-repeat-ngram", type=int, default=0, help="block repeated n-grams of this size")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy/beam")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=30)


def _params(a):
    from captioner.decoding import DecodeParams

    strategy = "sample" if a.sample else "beam" if a.beam > 1 else "greedy"
    return DecodeParams(strategy=strategy, max_new_tokens=a.max_new_tokens, beam_size=a.beam,
                        length_penalty=a.length_penalty, no_repeat_ngram_size=a.no_repeat_ngram,
                        temperature=a.temperature, top_p=a.top_p)


# ----------------------------------------------------------------------------- commands
def cmd_generate_data(a, _):
    from captioner.synthetic import generate

    out = generate(a.out, images=a.images, seed=a.seed, side=a.side)
    print(f"wrote {a.images} images and {a.images * 5} captions to {out} (Kaggle Flickr30k layout)")


def cmd_train(a, overrides):
    from captioner.config import load_config
    from captioner.train import train

    cfg = load_config(a.config, overrides)
    res = train(cfg, resume=a.resume, progress=not a.no_progress, overwrite=a.overwrite)
    if res.best["value"] > float("-inf"):
        log.info("done: step %d, best %s %.4f at step %d; checkpoints in %s", res.step, res.best["metric"],
                 res.best["value"], res.best["step"], res.out_dir)


def cmd_evaluate(a, _):
    from captioner.evaluate import evaluate

    r = evaluate(a.checkpoint, split=a.split, out_dir=a.out, data_source=a.data, params=_params(a),
                 max_images=a.max_images, meteor=not a.no_meteor)
    print(json.dumps(r["metrics"], indent=2))
    print(f"wrote {r['out_dir']}/metrics.json and samples.html")


def cmd_caption(a, _):
    if a.url:
        from captioner.client import TLS, caption_files

        certs = {k: getattr(a, k) for k in ("root_certificates", "private_key", "certificate_chain")}
        if any(certs.values()) and not a.ssl:
            raise SystemExit("caption: --root-certificates/--private-key/--certificate-chain need --ssl")
        failed = 0
        for path, cap in caption_files(a.url, a.images, beam=a.beam, concurrency=a.concurrency,
                                       model=a.model_name, tls=TLS(**certs) if a.ssl else None):
            if cap.startswith("ERROR:"):
                failed += 1
                print(f"{path}\t{cap}", file=sys.stderr)
            else:
                print(f"{path}\t{cap}")
        if failed:
            raise SystemExit(1)
        return
    if not a.checkpoint:
        raise SystemExit("caption: give --checkpoint CKPT (PyTorch) or --url HOST:PORT (Triton/`captioner serve`)")
    import numpy as np

    from captioner.checkpoint import load_checkpoint
    from captioner.inference import caption_arrays
    from captioner.preprocess import ImageError, preprocess_path

    ck = load_checkpoint(a.checkpoint)
    good, arrays, failed = [], [], 0
    for p in a.images:
        try:
            arrays.append(preprocess_path(p, ck.preprocess))
            good.append(p)
        except ImageError as e:
            print(f"{p}\tERROR: {e}", file=sys.stderr)
            failed += 1
    if arrays:
        for p, c in zip(good, caption_arrays(ck.model, ck.tokenizer, np.stack(arrays), _params(a))):
            print(f"{p}\t{c}")
    if failed:
        raise SystemExit(1)


def cmd_export(a, _):
    from captioner.export import export

    r = export(a.checkpoint, a.out, device=a.device, quantize=a.quantize, verify=not a.no_verify,
               parity_images=a.parity_images, optimize=not a.no_optimize)
    if "parity" in r:
        p = r["parity"]
        print(f"parity: encoder max|diff| {p['encoder_max_abs_diff']:.2e}, per-step logits max|diff| "
              f"{p['logits_max_abs_diff']:.2e}, greedy captions equal {p['captions_equal']}/{p['images']}")
    if "parity_int8" in r:
        q = r["parity_int8"]
        print(f"int8 parity: logits max|diff| {q['logits_max_abs_diff']:.3f}, greedy captions equal "
              f"{q['captions_equal']}/{q['images']}")
    print(f"wrote Triton model repository {a.out}")


def cmd_serve(a, _):
    from captioner.serve import serve_forever

    from captioner.triton_repo import RepositoryError

    try:
        serve_forever(a.repo, host=a.host, port=a.grpc_port, threads=a.threads, control=a.model_control_mode,
                      load=a.load_model, restricted=a.grpc_restricted_protocol)
    except RepositoryError as e:
        raise SystemExit(f"serve: Triton would refuse this repository: {e}") from None


def _store(a, uri, create=False):
    from captioner.storage import open_store

    return open_store(uri, endpoint=a.s3_endpoint, secure=a.s3_secure, create=create)


def cmd_ingest(a, _):
    from captioner.ingest import IngestOptions, ingest

    o = IngestOptions(shard_mb=a.shard_mb, max_side=a.max_side, workers=a.workers, val_fraction=a.val_fraction,
                      test_fraction=a.test_fraction, split_seed=a.split_seed, format=a.format, image_root=a.image_root,
                      strip_metadata=a.strip_metadata, progress=not a.no_progress)
    r = ingest(a.source, a.dest, o, store=_store(a, a.dest, create=True))
    print(json.dumps(r, indent=2))


def cmd_verify(a, _):
    from captioner.ingest import verify

    r = verify(a.dest, store=_store(a, a.dest), workers=a.workers)
    print(json.dumps(r, indent=2))
    if not r["ok"]:
        raise SystemExit(1)


def cmd_pipeline(a, overrides):
    from captioner import kfp_pipeline as kp

    if a.action == "compile":
        kp.compile_pipeline(a.out or "captioner-pipeline.yaml", train_in_pod=a.train_in_pod)
        print(f"wrote {a.out or 'captioner-pipeline.yaml'} (upload it in the Kubeflow Pipelines UI)")
        return
    if not a.source:
        raise SystemExit("pipeline run: --source is required (a Flickr30k folder/zip or captions JSON; "
                         "with --host an s3:// URI)")
    common = dict(config=a.config, overrides=list(overrides), min_cider=a.min_cider, eval_max_images=a.eval_max_images,
                  val_fraction=a.val_fraction, test_fraction=a.test_fraction, shard_mb=a.shard_mb)
    if not a.host:
        args = kp.local_arguments(a.workdir, a.source, **common)
        kp.run_local(args, Path(a.workdir).resolve() / "pipeline_root")
        print(f"pipeline finished; artefacts under {Path(a.workdir).resolve()}")
        return
    import os

    cluster = {k: v for k, v in dict(workers=a.workers, gpus_per_worker=a.gpus_per_worker, cloud=a.cloud,
                                     image=a.image, namespace=a.job_namespace, max_cost=a.max_cost,
                                     price_per_gpu_hour=a.price_per_gpu_hour).items() if v is not None}
    args = kp.host_arguments(a.source, a.data_uri, a.model_uri, a.repo_uri, a.serving_uri, **common,
                             export_device=a.export_device, triton_url=a.triton_url, nproc=a.nproc,
                             cluster_settings=cluster)
    print(kp.run_host(a.host, args, namespace=a.namespace, existing_token=os.environ.get(a.token_env),
                      cookies=os.environ.get(a.cookies_env), ssl_ca_cert=a.ssl_ca_cert, train_in_pod=a.train_in_pod))


def cmd_job(a, overrides):
    """`captioner job render`: the PyTorchJob the pipeline's train step would create."""
    import yaml

    from captioner.config import load_config
    from captioner.pytorchjob import job_name, training_job

    load_config(a.config, [f"--data.source={a.data}", *overrides])  # fail here, not in the pods
    job = training_job(a.name or job_name("captioner-train", a.model_uri), a.config,
                       [f"--data.source={a.data}", *overrides], a.model_uri, workers=a.nodes,
                       gpus_per_worker=a.gpus_per_node, image=a.image, namespace=a.namespace, cloud=a.cloud,
                       min_workers=a.min_nodes, max_workers=a.max_nodes)
    sys.stdout.write(yaml.safe_dump(job, sort_keys=False))


def cmd_demo(a, _):
    from captioner.demo import run_demo

    run_demo(a.workdir, images=a.images, epochs=a.epochs, min_cider=a.min_cider)


def cmd_bench(a, _):
    import importlib

    mod = {"train": "benchmarks.train_throughput", "latency": "benchmarks.caption_latency",
           "ingest": "benchmarks.ingest_throughput"}[a.what]
    importlib.import_module(mod).main(a.rest)


COMMANDS = {}
from captioner.deployment import JOB_NAMESPACE, NODE_POOLS, TRAINER_IMAGE  # noqa: E402 - defaults in --help


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="captioner", description=(
        "Image captioning platform: generate data, train a ViT + Transformer captioner, evaluate, "
        "export to ONNX/Triton, serve over Triton's gRPC protocol, ingest into object storage and run the "
        "Kubeflow pipeline."))
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("generate-data", help="write a synthetic captioned image set (Kaggle Flickr30k layout)")
    s.add_argument("out", help="output folder (gets results.csv and flickr30k_images/)")
    s.add_argument("--images", type=int, default=1000, help="number of images (5 captions each)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--side", type=int, default=128, help="image side in pixels")
    s.set_defaults(fn=cmd_generate_data)

    s = sub.add_parser("train", help="train (one process, or under torchrun for DDP)", description=(
        "Train from a config preset or YAML file plus --section.key=value overrides, e.g. "
        "`captioner train --config tiny-cpu --data.source=data/synth --train.out_dir=runs/x --train.epochs=5`. "
        "Sections: model, data, train (see captioner/config.py and captioner/model.py for every key)."))
    s.add_argument("--config", default="tiny-cpu", help="preset name (configs/*.yaml) or YAML path")
    s.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt_latest.pt, else from the model "
                   "store (--train.publish_uri); start fresh when neither has one")
    s.add_argument("--overwrite", action="store_true", help="replace a run already in OUT_DIR / the model store "
                   "(without --resume or --overwrite such a run is refused and left untouched)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_train, overrides_ok=True)

    s = sub.add_parser("evaluate", help="caption a split and report BLEU/METEOR/ROUGE-L/CIDEr-D")
    s.add_argument("checkpoint", help="checkpoint file or run folder (uses ckpt_best.pt)")
    s.add_argument("--split", default="test", choices=["train", "val", "test"])
    s.add_argument("--data", default=None, help="data source (default: the one in the checkpoint's config)")
    s.add_argument("--out", default=None, help="output folder (default: RUN/eval_SPLIT)")
    s.add_argument("--max-images", type=int, default=0)
    s.add_argument("--no-meteor", action="store_true", help="skip METEOR (Java) even where Java exists")
    _decode_args(s)
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("caption", help="print one caption per image (PyTorch checkpoint or a Triton/gRPC server)")
    s.add_argument("images", nargs="+", help="image files")
    s.add_argument("--checkpoint", "-c", default=None, help="checkpoint file or run folder (PyTorch path)")
    s.add_argument("--url", default=None, help="HOST:PORT of Triton or `captioner serve` (gRPC)")
    s.add_argument("--model-name", default="captioner", help="served model name (with --url)")
    s.add_argument("--concurrency", type=int, default=4, help="requests in flight (with --url)")
    g = s.add_argument_group("TLS (with --url; Triton --grpc-use-ssl / --grpc-use-ssl-mutual)")
    g.add_argument("--ssl", action="store_true", help="connect over TLS (default: plaintext)")
    g.add_argument("--root-certificates", metavar="PEM", help="CA to verify the server (default: system roots)")
    g.add_argument("--private-key", metavar="PEM", help="client key, for servers that require client certificates")
    g.add_argument("--certificate-chain", metavar="PEM", help="client certificate chain (with --private-key)")
    _decode_args(s)
    s.set_defaults(fn=cmd_caption)

    s = sub.add_parser("export", help="checkpoint -> Triton model repository (ONNX + Python backend + ensemble)",
                       description="Export encoder and decoder (with past key/values) to ONNX, write the Triton "
                                   "repository and verify onnxruntime against PyTorch (fails loudly on mismatch).")
    s.add_argument("checkpoint", help="checkpoint file or run folder")
    s.add_argument("--out", required=True, help="repository folder to (re)create")
    s.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                   help="instance kind in the ONNX models' configs (KIND_GPU for the cluster, KIND_CPU locally)")
    s.add_argument("--quantize", choices=["int8"], default=None, help="onnxruntime dynamic int8 quantization")
    s.add_argument("--no-verify", action="store_true", help="skip the onnxruntime/PyTorch parity check")
    s.add_argument("--no-optimize", action="store_true", help="skip onnxruntime's transformer graph fusions")
    s.add_argument("--parity-images", type=int, default=8)
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("serve", help="serve a model repository over Triton's gRPC protocol (local stand-in)")
    s.add_argument("repo", help="model repository written by `captioner export`")
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = default)")
    s.add_argument("--model-control-mode", choices=["none", "explicit"], default="none",
                   help="as tritonserver: 'none' loads every model (and refuses a repository Triton would refuse); "
                        "'explicit' loads only --load-model names and what RepositoryModelLoad asks for")
    s.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="explicit mode: load NAME at start (repeat; dependencies first, e.g. decoder then captioner)")
    s.add_argument("--grpc-restricted-protocol", default=None, metavar="model-repository:KEY=VALUE",
                   help="as tritonserver: model load/unload/index calls must carry header KEY with VALUE")
    s.set_defaults(fn=cmd_serve)

    def s3_flags(sp):
        g = sp.add_argument_group("object storage (s3:// URIs)")
        g.add_argument("--s3-endpoint", default=None,
                       help="host:port or http(s)://host:port (default: $CAPTIONER_S3_ENDPOINT); keys come from "
                            "$AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY")
        g.add_argument("--s3-secure", action="store_true", default=None, help="use TLS (default: $CAPTIONER_S3_SECURE)")

    s = sub.add_parser("ingest", help="validate, shard and upload a captioned image set to a folder or s3://",
                       description="SOURCE: a Kaggle Flickr30k folder or zip (results.csv + flickr30k_images/), a "
                                   "Karpathy split JSON or a COCO captions JSON (images next to it or --image-root). "
                                   "DEST: a folder or s3://bucket/prefix. Resumable: rerun after an interruption.")
    s.add_argument("source")
    s.add_argument("dest")
    s.add_argument("--shard-mb", type=float, default=64.0, help="target shard size in MB")
    s.add_argument("--max-side", type=int, default=0, help="resize images so the longer side is at most this")
    s.add_argument("--workers", type=int, default=8, help="parallel uploads / image checks")
    s.add_argument("--val-fraction", type=float, default=0.05)
    s.add_argument("--test-fraction", type=float, default=0.05)
    s.add_argument("--split-seed", type=int, default=0)
    s.add_argument("--format", default="auto", choices=["auto", "flickr30k", "karpathy", "coco"])
    s.add_argument("--image-root", default="", help="image folder for JSON sources")
    s.add_argument("--strip-metadata", action=argparse.BooleanOptionalAction, default=True,
                   help="drop EXIF (GPS, camera serials), XMP and comments from stored images, baking the EXIF "
                        "orientation into the pixels (default: on)")
    s.add_argument("--no-progress", action="store_true")
    s3_flags(s)
    s.set_defaults(fn=cmd_ingest)

    s = sub.add_parser("verify", help="re-check a dataset's manifest against the store (sizes and sha256)")
    s.add_argument("dest")
    s.add_argument("--workers", type=int, default=8)
    s3_flags(s)
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("pipeline", help="compile the Kubeflow pipeline, or run it (--local or --host URL)",
                       description="compile OUT.yaml: write the KFP v2 IR YAML. run --local: run every step on this "
                                   "machine (kfp.local.SubprocessRunner). run --host URL: submit to Kubeflow "
                                   "Pipelines (every location an s3:// URI). Extra --section.key=value arguments "
                                   "become training overrides.")
    s.add_argument("action", choices=["compile", "run"])
    s.add_argument("out", nargs="?", default=None, help="output YAML for compile")
    s.add_argument("--train-in-pod", action="store_true",
                   help="cluster: train inside the pipeline's own 1-GPU pod instead of launching a PyTorchJob")
    s.add_argument("--local", action="store_true", help="run here (the default when --host is not given)")
    s.add_argument("--source", default=None, help="dataset to ingest: a folder/zip/JSON here, an s3:// URI with --host")
    s.add_argument("--workdir", default="pipeline_out", help="local run: where data, model, repository go")
    s.add_argument("--config", default="tiny-cpu", help="training preset or YAML (default: %(default)s)")
    s.add_argument("--min-cider", type=float, default=0.5, help="quality gate: minimum CIDEr-D to deploy")
    s.add_argument("--eval-max-images", type=int, default=0, help="0 = the whole test split")
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--test-fraction", type=float, default=0.1)
    s.add_argument("--shard-mb", type=float, default=64.0, help="ingest shard size in MB")
    g = s.add_argument_group("run --host (Kubeflow Pipelines)")
    g.add_argument("--host", default=None, help="Kubeflow Pipelines endpoint, e.g. https://kubeflow.example.com/pipeline")
    g.add_argument("--namespace", default=None, help="multi-user Kubeflow: your profile namespace")
    g.add_argument("--token-env", default="KF_PIPELINES_TOKEN", metavar="VAR",
                   help="environment variable holding a bearer token for the endpoint (default: %(default)s)")
    g.add_argument("--cookies-env", default="KF_PIPELINES_COOKIES", metavar="VAR",
                   help="environment variable holding the session cookie, e.g. authservice_session=... "
                        "(default: %(default)s)")
    g.add_argument("--ssl-ca-cert", default=None, help="CA bundle for an endpoint with a private certificate")
    for k in ("data-uri", "model-uri", "repo-uri", "serving-uri"):
        g.add_argument(f"--{k}", default=None, help="s3:// URI")
    g.add_argument("--export-device", choices=["gpu", "cpu"], default="gpu",
                   help="Triton instance kind in the exported configs; cpu for a CPU-only cluster (kind overlay)")
    g.add_argument("--triton-url", default="", help="HOST:PORT of Triton's gRPC endpoint for the deploy step's reload")
    g.add_argument("--nproc", type=int, default=1, help="with --train-in-pod: processes (GPUs) in the train pod")
    g.add_argument("--workers", type=int, default=None, help="PyTorchJob worker nodes (default 2)")
    g.add_argument("--gpus-per-worker", type=int, default=None, help="GPUs per worker node (default 8)")
    g.add_argument("--cloud", choices=list(NODE_POOLS), default=None, help="node pool (default gke)")
    g.add_argument("--image", default=None, help="trainer image for the PyTorchJob")
    g.add_argument("--job-namespace", default=None, help="namespace of the PyTorchJob (default captioner)")
    g.add_argument("--max-cost", type=float, default=None, help="cost guard limit in $ (default 500)")
    g.add_argument("--price-per-gpu-hour", type=float, default=None, help="for the cost guard (default 3.0)")
    s.set_defaults(fn=cmd_pipeline, overrides_ok=True)

    s = sub.add_parser("job", help="render the training PyTorchJob for kubectl (no Kubeflow Pipelines needed)",
                       description="job render: print the PyTorchJob (Kubeflow Training Operator v1.9) that the "
                                   "pipeline's train step would create, e.g. `kubectl create -f <(captioner job render "
                                   "--config vit-b16-a100 --nodes 2 --gpus-per-node 8 --data s3://datasets/flickr30k/v1 "
                                   "--model-uri s3://models/runs/r1)`. Extra --section.key=value arguments become "
                                   "training overrides.")
    s.add_argument("action", choices=["render"])
    s.add_argument("--config", required=True, help="training preset or YAML inside the image")
    s.add_argument("--nodes", type=int, required=True, help="worker nodes (pods)")
    s.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node = processes per node (0 = CPU)")
    s.add_argument("--data", required=True, help="dataset written by `captioner ingest` (s3:// URI)")
    s.add_argument("--model-uri", required=True, help="model store for checkpoints (s3:// URI); restarts resume here")
    s.add_argument("--image", default=TRAINER_IMAGE, help="trainer image (default: %(default)s)")
    s.add_argument("--name", default=None, help="job name (default: derived from --model-uri)")
    s.add_argument("--namespace", default=JOB_NAMESPACE, help="default: %(default)s")
    s.add_argument("--cloud", choices=list(NODE_POOLS), default="gke", help="node pool (default: gke)")
    s.add_argument("--min-nodes", type=int, default=None, help="elastic: fewest nodes to run with (default: --nodes)")
    s.add_argument("--max-nodes", type=int, default=None, help="elastic: most nodes (default: --nodes)")
    s.set_defaults(fn=cmd_job, overrides_ok=True)

    s = sub.add_parser("demo", help="the main job end to end on generated data (what `make demo` runs)")
    s.add_argument("--workdir", default="demo_out")
    s.add_argument("--images", type=int, default=1500)
    s.add_argument("--epochs", type=int, default=8)
    s.add_argument("--min-cider", type=float, default=1.0, help="quality gate for the deploy step")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("bench", help="benchmarks (print side-by-side measurements)")
    s.add_argument("what", choices=["train", "latency", "ingest"],
                   help="train: encode-once vs per-pair throughput; latency: caption latency/throughput of the "
                        "no-cache baseline, PyTorch+KV cache, onnxruntime, int8; ingest: S3 ingest and loader speed")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    if extra and not getattr(a, "overrides_ok", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(a.verbose)
    from captioner.storage import StoreError  # (config.ConfigError is a ValueError: importing config loads torch)

    bad = [x for x in extra if not (x.startswith("--") and "=" in x)]
    if bad:
        parser.error(f"overrides must look like --section.key=value, got: {' '.join(bad)}")
    try:
        a.fn(a, extra)
    except (FileNotFoundError, ValueError, StoreError) as e:
        log.error("%s", e)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
