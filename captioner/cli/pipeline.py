"""`captioner pipeline compile|run`: the Kubeflow pipeline, compiled, run here or submitted."""
from __future__ import annotations

import logging
from pathlib import Path

from captioner.cli.args import COUNT_OR_ALL, FRACTION, POSITIVE, check_for_pods, float_range, int_range
from captioner.core.deployment import NODE_POOLS

log = logging.getLogger("captioner")


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
        from captioner.pipeline.local_run import print_outcome, run_pipeline_here, write_summary

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

    check_for_pods("pipeline run --host", a.config, {})
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


def add_pipeline(sub, common: dict) -> None:
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
