"""What each Kubeflow pipeline step does. KFP components (captioner/pipeline/components.py) are thin shells
that call one function here; these take plain values and URIs, so they run the same in a
KFP pod, in `kfp.local` and in tests."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from captioner.core.deployment import CKPT_BEST

log = logging.getLogger(__name__)
CHAMPION = "champion.json"


def ingest_step(source: str, dest: str, shard_mb: float = 64.0, val_fraction: float = 0.05,
                test_fraction: float = 0.05) -> dict:
    from captioner.data.ingest import IngestOptions, ingest
    from captioner.io.storage import fetch, is_s3

    opts = IngestOptions(shard_mb=shard_mb, val_fraction=val_fraction, test_fraction=test_fraction, progress=False)
    if not is_s3(source):
        return ingest(source, dest, opts)
    with tempfile.TemporaryDirectory(prefix="captioner-source-") as tmp:  # a raw dataset uploaded to the store
        return ingest(str(fetch(source, tmp)), dest, opts)


def train_step(data_uri: str, model_uri: str, config: str, overrides: list[str], mode: str = "local",
               nproc: int = 1, run_id: str = "local", cluster: dict | None = None) -> dict:
    """local: train on this machine (torchrun when nproc > 1); cluster: launch a PyTorchJob
    after the cost guard and wait for it. Either way checkpoints are mirrored to model_uri
    (a folder or s3:// prefix) as they are written, a retry of the same run (same run_id,
    the KFP job id) resumes from the latest one there, and the checkpoint URI is returned."""
    from captioner.core.config import load_config
    from captioner.core.deployment import MIN_KFP_BACKEND

    if "{{" in run_id:
        raise ValueError(f"run id {run_id!r} is an unresolved KFP placeholder: the Kubeflow Pipelines backend is "
                         f"older than {MIN_KFP_BACKEND}, which this pipeline needs")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", run_id):
        raise ValueError(f"run id {run_id!r}: expected letters, digits, '.', '_' or '-'")
    # quoted: an all-digit id (kfp.local uses those) must stay a string in the YAML override
    ov = [f"--data.source={data_uri}", *overrides, f"--train.publish_uri={model_uri}", f'--train.run_id="{run_id}"']
    cfg = load_config(config, ov)
    if mode == "cluster":
        return _train_cluster(cfg, config, ov, model_uri, run_id, cluster or {})
    if mode != "local":
        raise ValueError(f"train mode must be 'local' or 'cluster', got {mode!r}")
    with tempfile.TemporaryDirectory(prefix="captioner-train-") as tmp:
        out = str(Path(tmp) / "run")
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "captioner", "train", "--config", config, "--no-progress", "--resume", *ov,
                   f"--train.out_dir={out}"]
            log.info("running %s", " ".join(cmd))
            subprocess.run(cmd, check=True)
        else:
            from captioner.training.train import RunExists, train

            cfg.train.out_dir = out
            try:
                train(cfg, resume=True, progress=False)
            except RunExists as e:  # permanent: the pipeline's wording, not `captioner train`'s flags
                raise RunExists(f"the model URI {model_uri} holds the checkpoints of another pipeline run "
                                f"({str(e).split('belongs to run ', 1)[-1].split(',')[0]}): give a new --model-uri, "
                                "or locally a new --workdir or --overwrite") from None
    return {"checkpoint": f"{model_uri.rstrip('/')}/{CKPT_BEST}", "model_uri": model_uri}


def _train_cluster(cfg, config: str, overrides: list[str], model_uri: str, run_id: str, c: dict,
                   api=None) -> dict:
    """Launch the run as a PyTorchJob or a TrainJob (--train.api; auto = the kind the cluster
    serves), after the cost guard, and wait for it. `api`: a KubeApi-like factory (tests)."""
    from captioner.cluster.jobs import KubeApi, served_kind
    from captioner.cluster.pytorchjob import (DEFAULT_PAIRS_PER_S_PER_GPU, DEFAULT_PRICE_PER_GPU_HOUR, check_cost,
                                      estimate_cost, job_name, launch_and_wait, training_job)
    from captioner.data.manifest import open_shard_source

    _, manifest = open_shard_source(cfg.data.source)
    pairs = sum(len(it.captions) for it in manifest.items_in("train"))
    workers, gpus = int(c.get("workers", 2)), int(c.get("gpus_per_worker", 8))
    est = estimate_cost(pairs, cfg.train.epochs, float(c.get("pairs_per_s_per_gpu", DEFAULT_PAIRS_PER_S_PER_GPU)),
                        workers * max(gpus, 1), float(c.get("price_per_gpu_hour", DEFAULT_PRICE_PER_GPU_HOUR)))
    check_cost(est, float(c.get("max_cost", 500.0)), bool(c.get("override_cost", False)))
    make_api = api or KubeApi
    kind = served_kind(cfg.train.api, make_api().discover)
    name = job_name("captioner-train", run_id)  # the same on every retry: re-attaches on 409
    kw = {k: c[k] for k in ("image", "namespace", "cloud", "nproc_per_node", "min_workers", "max_workers", "cpu",
                            "memory", "shm_size") if c.get(k)}
    job = training_job(name, config, [o for o in overrides if not o.startswith("--train.publish_uri=")], model_uri,
                       workers=workers, gpus_per_worker=gpus, api=kind.api, **kw)
    launch_and_wait(make_api(kind), job, timeout_s=float(c.get("timeout_s", 48 * 3600)),
                    on_log=lambda t: print(t, end="", flush=True))
    return {"checkpoint": f"{model_uri.rstrip('/')}/{CKPT_BEST}", "model_uri": model_uri, "job": name,
            "kind": job["kind"], "estimate": est.text()}


def evaluate_step(checkpoint_uri: str, data_uri: str, out_dir: str, split: str = "test", max_images: int = 0) -> dict:
    from captioner.training.evaluate import evaluate
    from captioner.io.storage import fetch

    with tempfile.TemporaryDirectory(prefix="captioner-eval-") as tmp:
        ck = fetch(checkpoint_uri, tmp)
        r = evaluate(str(ck), split=split, out_dir=out_dir, data_source=data_uri, max_images=max_images)
    return {"metrics": r["metrics"], "out_dir": r["out_dir"], "images": len(r["records"])}


def report_step(checkpoint_uri: str, samples_html: str, dest: str) -> dict:
    """The training run's HTML report (curves, numbers, config, worst samples) for the Kubeflow
    UI, written to dest; returns the numbers for the run comparison (KFP Metrics). The run is
    the checkpoint's folder in the model store, where training published its TensorBoard events."""
    from captioner.training.report import write_report

    run = checkpoint_uri.rsplit("/", 1)[0] if checkpoint_uri.rstrip("/").endswith(".pt") else checkpoint_uri
    _, metrics = write_report(run, dest, samples_html or None)
    return metrics


def export_step(checkpoint_uri: str, repo_uri: str, device: str = "gpu") -> dict:
    from captioner.export.exporter import export
    from captioner.io.storage import fetch, publish

    with tempfile.TemporaryDirectory(prefix="captioner-export-") as tmp:
        ck = fetch(checkpoint_uri, Path(tmp) / "ckpt")
        local = Path(tmp) / "repo"
        report = export(str(ck), str(local), device=device)
        publish(local, repo_uri)
    return {"repo_uri": repo_uri, "parity": report.get("parity", {})}


def champion_score(serving_uri: str) -> float:
    """The deployed model's recorded CIDEr-D, or -1 when nothing is deployed."""
    from captioner.io.storage import open_store

    try:
        return float(json.loads(open_store(serving_uri).get_bytes(CHAMPION))["CIDEr"])
    except Exception as e:  # noqa: BLE001 - no champion yet
        log.info("no champion at %s (%s)", serving_uri, e)
        return -1.0


def should_deploy(cider: float, min_cider: float, champion: float) -> bool:
    ok = cider >= min_cider and cider >= champion
    log.info("quality gate: CIDEr-D %.4f vs minimum %.4f and champion %.4f -> %s", cider, min_cider, champion,
             "deploy" if ok else "keep the champion")
    return ok


def triton_endpoints(triton_url: str) -> list[str]:
    """Every replica behind `triton_url`: a comma-separated list of HOST:PORT, each host
    resolved to all its IPv4 addresses (a headless Service name resolves to one address per
    ready pod), so a load reaches every replica rather than the one a Service picks."""
    import socket

    out: list[str] = []
    for item in filter(None, (x.strip() for x in triton_url.split(","))):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"Triton URL must be HOST:PORT[,HOST:PORT...], got {item!r}")
        try:
            addrs = sorted({ai[4][0] for ai in socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)})
        except socket.gaierror as e:
            raise RuntimeError(f"cannot resolve Triton host {host!r}: {e}") from None
        out += [f"{a}:{port}" for a in addrs if f"{a}:{port}" not in out]
    return out


def load_on_replicas(triton_url: str, version: int, key: str | None) -> list[str]:
    """Load, on every replica, what serves a caption (triton_repo.LOAD_ORDER: the ensemble)
    through the restricted model-repository protocol, and check the new version is ready."""
    import tritonclient.grpc as grpcclient

    from captioner.core.deployment import control_headers
    from captioner.core.names import ENSEMBLE
    from captioner.serving.triton_repo import LOAD_ORDER

    headers = control_headers(key, "grpc") if key else None  # gRPC: "triton-grpc-protocol-" + KEY
    done = []
    for ep in triton_endpoints(triton_url):
        c = grpcclient.InferenceServerClient(ep)
        for m in LOAD_ORDER:
            log.info("%s: loading %s", ep, m)
            c.load_model(m, headers=headers)
        if not c.is_model_ready(ENSEMBLE, str(version)):
            raise RuntimeError(f"{ep}: {ENSEMBLE} version {version} is not ready after loading")
        done.append(ep)
    return done


def deploy_step(repo_uri: str, serving_uri: str, cider: float, triton_url: str = "", model: str = "captioner",
                target: str = "triton", kserve: dict | None = None) -> dict:
    """Publish the repository to the serving location as a new numeric version (switched
    atomically, see triton_repo.publish_version), then make it live and only then record the
    champion:
    - target "triton": load it on every Triton replica in explicit model-control mode
      (decoder, then the ensemble; the control key comes from the CAPTIONER_TRITON_CONTROL_KEY
      env, i.e. the Secret);
    - target "kserve": roll the InferenceService (storageUri = the serving location) out to
      it as a canary and promote it after a live check, or roll back (captioner/cluster/kserve.py)."""
    from captioner.core.deployment import CONTROL_KEY_ENV
    from captioner.io.storage import fetch, open_store
    from captioner.serving.triton_repo import publish_version

    if target not in ("triton", "kserve"):
        raise ValueError(f"deploy target must be 'triton' or 'kserve', got {target!r}")
    with tempfile.TemporaryDirectory(prefix="captioner-deploy-") as tmp:
        local = fetch(repo_uri, tmp)
        store = open_store(serving_uri, create=True)
        previous = _champion_version(store)
        version = publish_version(local, store)
        log.info("published %s to %s as version %d", repo_uri, serving_uri, version)
        extra: dict = {}
        if target == "kserve":
            try:
                extra = _rollout_kserve(local, serving_uri, version, dict(kserve or {}))
            except Exception:
                # the previous revision's pods copy storageUri whenever they start: point it back
                if previous is not None:
                    from captioner.serving.triton_repo import pin_ensemble

                    pin_ensemble(store, previous)
                    log.warning("rolled back: %s serves version %d again", serving_uri, previous)
                raise
            loaded = []
        else:
            loaded = load_on_replicas(triton_url, version, os.environ.get(CONTROL_KEY_ENV)) if triton_url else []
        store.put_bytes(CHAMPION, json.dumps({"CIDEr": cider, "repo": repo_uri, "version": version}).encode())
    return {"serving_uri": serving_uri, "version": version, "triton_loaded": bool(loaded), "replicas": loaded,
            "model": model, "pid": os.getpid(), "target": target, **extra}


def _champion_version(store) -> int | None:
    try:
        return int(json.loads(store.get_bytes(CHAMPION))["version"])
    except Exception:  # noqa: BLE001 - nothing deployed yet
        return None


def _check_images(where: str) -> list[bytes]:
    """A few held-out images for the live check: the files in `where` (a folder), else a
    fixed synthetic set (the same every run)."""
    if not where:
        from captioner.data.synthetic import generate

        with tempfile.TemporaryDirectory(prefix="captioner-check-") as d:
            generate(d, images=3, seed=20261127, side=96, progress=False)
            return [p.read_bytes() for p in sorted(Path(d).rglob("*.jpg"))]
    files = sorted(p for p in Path(where).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:4]
    if not files:
        raise ValueError(f"no .jpg/.png images in {where!r} for the live check")
    return [p.read_bytes() for p in files]


def _rollout_kserve(local: Path, serving_uri: str, version: int, k: dict, api=None) -> dict:
    """Canary rollout of `version` on the InferenceService; raises kserve.RolloutFailed after
    a rollback (so no champion is recorded). Settings (all optional): name, namespace,
    canary_percent (10), gpus, min_replicas, max_replicas, timeout_s, live_url (HOST:PORT of
    the v2 gRPC endpoint; default: the canary's tagged URL on port 80), check_images."""
    from captioner.cluster import kserve as ks
    kw = {f: str(k[f]) for f in ("name", "namespace") if k.get(f)}
    kw.update({f: int(k[f]) for f in ("gpus", "min_replicas", "max_replicas") if k.get(f) is not None})
    spec = ks.IsvcSpec(storage_uri=serving_uri, version=version, **kw)
    images = _check_images(k.get("check_images", ""))
    want = ks.expected_captions(str(local), images)

    def check(isvc: dict) -> None:
        t = ks.canary_target(isvc) or {}
        url = k.get("live_url") or ks.grpc_target(t.get("url") or ks.predictor_status(isvc).get("url", ""))
        ks.live_check(url, images, want)

    percent = int(k.get("canary_percent", ks.DEFAULT_CANARY_PERCENT))
    r = ks.rollout(api or ks.KubeIsvcApi(), spec, check, percent=percent,
                   timeout_s=float(k.get("timeout_s", 900)), poll_s=float(k.get("poll_s", 10)))
    return {"revision": r["revision"], "previous_revision": r["previous"]}
