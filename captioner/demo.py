"""`make demo`: the main job end to end on generated data, as the local Kubeflow pipeline run:
generate -> [ingest -> train -> evaluate -> export -> quality gate -> deploy] -> serve the
deployed repository -> caption held-out images through tritonclient; prints captions and
metrics."""
from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _task_output(root: Path, task: str) -> dict:
    return json.loads(next(root.glob(f"*/{task}/executor_output.json")).read_text())


def run_demo(workdir: str = "demo_out", images: int = 1500, epochs: int = 8, seed: int = 0,
             min_cider: float = 1.0, serve: bool = False) -> dict:
    import numpy as np
    import torch

    from captioner.modeling.checkpoint import load_checkpoint
    from captioner.core.deployment import CKPT_BEST, CONTROL_KEY_ENV
    from captioner.serving.client import caption_bytes, wait_ready
    from captioner.modeling.inference import caption_tensor
    from captioner.pipeline.runner import local_arguments
    from captioner.pipeline.local_run import run_pipeline_here
    from captioner.serving.core import image_bytes_to_pixels
    from captioner.data.manifest import materialize, open_shard_source
    from captioner.serving.stack import ModelServer
    from captioner.data.synthetic import attribute_accuracy, generate
    from captioner.serving.triton_repo import LOAD_ORDER

    t0 = time.time()
    wd = Path(workdir).resolve()
    src = wd / "source"
    if not (src / "results.csv").exists():
        generate(src, images=images, seed=seed)
    run_dir = wd / "run"
    for sub in ("pipeline_root", "serving", "model"):  # a fresh pipeline run, model and deployment each time
        if (run_dir / sub).exists():
            import shutil

            shutil.rmtree(run_dir / sub)
    # The cluster's Triton, here: the real tritonserver where it runs (else `captioner serve`), with
    # explicit model control over the (still empty) serving folder and the model-repository
    # protocol restricted to a per-run key; the pipeline's deploy step gets the key through the
    # environment, as the Secret gives it on the cluster.
    (run_dir / "serving").mkdir(parents=True)
    key = secrets.token_hex(16)
    os.environ[CONTROL_KEY_ENV] = key
    server = ModelServer(run_dir / "serving", key, run_dir)
    url = server.url
    try:
        wait_ready(url, timeout=120, model="")
        args = local_arguments(run_dir, src, "tiny-cpu", [f"--train.epochs={epochs}"], min_cider=min_cider,
                               val_fraction=0.1, test_fraction=0.1, shard_mb=16.0, triton_url=url)
        print(f"running the captioner pipeline locally (kfp.local.SubprocessRunner) under {run_dir} ...", flush=True)
        run_pipeline_here(args, run_dir / "pipeline_root", run_dir / "pipeline.log",
                          verbose=logging.getLogger("captioner").isEnabledFor(logging.DEBUG))
    except BaseException:
        server.stop()
        raise
    root = run_dir / "pipeline_root"
    ev = _task_output(root, "evaluate")
    metrics = ev["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    deployed = (run_dir / "serving" / "captioner" / "config.pbtxt").exists()
    if deployed:
        dep = json.loads(_task_output(root, "deploy")["parameterValues"]["Output"])
        print(f"deploy: published version {dep['version']} to {dep['serving_uri']} and loaded "
              f"{' then '.join(LOAD_ORDER)} on {', '.join(dep['replicas'])} through the restricted control API")
    else:  # nothing deployed: serve the exported repository instead
        server.stop()
        server = ModelServer(Path(args["repo_uri"]), None, run_dir)
        url = server.url

    store, manifest = open_shard_source(args["data_uri"])
    held_out = materialize(store, manifest, "test", wd / "test_images")
    try:
        wait_ready(url, timeout=120)
        served = caption_bytes(url, [Path(r.path).read_bytes() for r in held_out[:5]])
        all_served = []
        for i in range(0, len(held_out), 8):
            all_served += caption_bytes(url, [Path(r.path).read_bytes() for r in held_out[i:i + 8]])
    finally:
        server.stop()

    ck = load_checkpoint(Path(args["model_uri"]) / CKPT_BEST)
    pixels = image_bytes_to_pixels(np.array([Path(r.path).read_bytes() for r in held_out[:5]], dtype=object),
                                   ck.preprocess)
    torch_caps = caption_tensor(ck.model, ck.tokenizer, torch.from_numpy(pixels))
    print(f"\n=== 5 held-out test images, captioned through tritonclient gRPC by {server.name} "
          f"({'deployed' if deployed else 'exported'} repository) ===")
    for r, cap, tc in zip(held_out, served, torch_caps):
        same = "same as PyTorch" if cap == tc else f"PyTorch: {tc!r}"
        print(f"{r.image_id}: {cap!r} ({same})\n    reference: {r.captions[0]!r}")
    report = json.loads((Path(args["repo_uri"]) / "export_report.json").read_text())
    p = report["parity"]
    print(f"\nONNX parity: encoder max|diff| {p['encoder_max_abs_diff']:.1e}, logits max|diff| "
          f"{p['logits_max_abs_diff']:.1e}, decode loop's step graph (cache {report.get('kv_cache', '?')}) "
          f"log-probs max|diff| {p.get('loop_logprobs_max_abs_diff', 0):.1e}, greedy captions equal "
          f"{p['captions_equal']}/{p['images']}")
    print(f"\n=== test metrics ({int(metrics.get('images', len(held_out)))} held-out images, greedy, pycocoevalcap) ===")
    print(json.dumps({k: v for k, v in metrics.items() if k != "images"}, indent=2))
    acc = attribute_accuracy({r.image_id: r.captions for r in held_out},
                             {r.image_id: c for r, c in zip(held_out, all_served)})
    print("attribute accuracy of the served captions (the generator knows the truth; an attribute left out "
          "counts as wrong): " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()))
    gate = _task_output(root, "gate")["parameterValues"]["Output"]
    print(f"quality gate (CIDEr-D >= {min_cider} and >= champion): {'passed: deployed to ' + str(run_dir / 'serving') if gate else 'not passed: deploy skipped'}")
    from captioner.pipeline.local_run import write_summary

    summary = write_summary(run_dir, root, {**args, "min_cider": min_cider}, extra={
        "attribute_accuracy": acc,
        "served_captions": [{"image": r.image_id, "caption": c, "reference": r.captions[0]}
                            for r, c in zip(held_out, all_served)],
        "seconds": round(time.time() - t0)})
    print(f"\nresults: {summary['_path']} (metrics, attribute accuracy, served captions, deploy decision); "
          f"captions, worst first: {run_dir / summary['report'] if summary.get('report') else '-'}")
    print(f"artefacts under {wd}: run/data (shards + manifest), run/model (checkpoints), run/model_repository, "
          f"run/pipeline_root (KFP outputs), run/pipeline.log (every step's output); {time.time() - t0:.0f}s")
    report = next(root.glob("*/evaluate/**/report*.html"), None)  # the evaluate step's `report` HTML artifact
    if report is not None:
        print(f"run report (curves, throughput, cost, worst samples): {report}\n"
              f"TensorBoard: tensorboard --logdir {Path(args['model_uri']) / 'tb'}")
    from captioner.serving.stack import front_door  # the web page and Triton's HTTP API, with --serve

    front_door(run_dir / "serving" if deployed else args["repo_uri"], serve)
    return {"metrics": metrics, "deployed": deployed, "captions": served}
