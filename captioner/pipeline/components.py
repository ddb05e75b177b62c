"""Kubeflow Pipelines v2 lightweight components: thin shells over `captioner.pipeline.steps`.

Each parses its inputs, calls one function and writes its outputs (artifacts and their
metadata). The image is the trainer image, which has the `captioner` package installed;
`kfp.local.SubprocessRunner(use_venv=False)` runs them in the current environment.
"""
import functools
import os
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from captioner.core.deployment import TRAINER_IMAGE

IMAGE = os.environ.get("CAPTIONER_IMAGE", TRAINER_IMAGE)
# kfp is pinned in the trainer image (docker/trainer.Dockerfile), so no component runs
# `pip install kfp` at start (which needs a package index reachable from the cluster).
component = functools.partial(dsl.component, base_image=IMAGE, install_kfp_package=False)


@component
def ingest(source: str, dest: str, shard_mb: float, val_fraction: float, test_fraction: float,
           dataset: Output[Dataset]):
    import json

    from captioner.pipeline.steps import ingest_step

    r = ingest_step(source, dest, shard_mb, val_fraction, test_fraction)
    dataset.metadata.update({"manifest": r["manifest"], "uri": r["dest"], "items": r["items"], "shards": r["shards"]})
    with open(dataset.path, "w") as f:
        json.dump(r, f)


@component
def train(dataset: Input[Dataset], model_uri: str, config: str, overrides: list, mode: str, nproc: int,
          cluster: dict, run_id: str, model: Output[Model]):
    """run_id: the KFP pipeline job id (the same on every retry of this task)."""
    import json

    from captioner.pipeline.steps import train_step

    r = train_step(dataset.metadata["uri"], model_uri, config, list(overrides), mode, nproc, run_id, cluster)
    model.metadata.update(r)
    with open(model.path, "w") as f:
        json.dump(r, f)


@component
def evaluate(dataset: Input[Dataset], model: Input[Model], max_images: int, metrics: Output[Metrics],
             samples: Output[HTML], report: Output[HTML],
             training: Output[Metrics]) -> NamedTuple("EvalOutputs", [("cider", float), ("bleu4", float)]):
    """metrics/samples: the test split; report/training: the finished training run's curves
    (self-contained HTML for the UI) and its numbers for the run comparison."""
    import os
    import tempfile
    from collections import namedtuple

    from captioner.core.runs import EVAL_SAMPLES_FILE
    from captioner.pipeline.steps import evaluate_step, report_step

    out = tempfile.mkdtemp(prefix="eval-")
    r = evaluate_step(model.metadata["checkpoint"], dataset.metadata["uri"], out, max_images=max_images)
    for k, v in r["metrics"].items():
        metrics.log_metric(k, round(float(v), 5))
    metrics.log_metric("images", r["images"])
    samples.path += ".html"  # the launcher uploads to the URI set here (launcher_v2.go mergeRuntimeArtifacts)
    page = os.path.join(r["out_dir"], EVAL_SAMPLES_FILE)
    with open(page) as src, open(samples.path, "w") as dst:
        dst.write(src.read())
    report.path += ".html"
    for k, v in report_step(model.metadata["checkpoint"], page, report.path).items():
        training.log_metric(k, v)
    return namedtuple("EvalOutputs", ["cider", "bleu4"])(float(r["metrics"]["CIDEr"]), float(r["metrics"]["BLEU-4"]))


@component
def export(model: Input[Model], repo_uri: str, device: str, repository: Output[Artifact]):
    import json

    from captioner.pipeline.steps import export_step

    r = export_step(model.metadata["checkpoint"], repo_uri, device)
    repository.metadata.update({"repo_uri": r["repo_uri"], **{f"parity_{k}": v for k, v in r["parity"].items()
                                                              if not isinstance(v, (list, dict))}})
    with open(repository.path, "w") as f:
        json.dump(r, f)


@component
def champion(serving_uri: str) -> float:
    from captioner.pipeline.steps import champion_score

    return champion_score(serving_uri)


@component
def gate(cider: float, min_cider: float, champion_cider: float) -> bool:
    from captioner.pipeline.steps import should_deploy

    return should_deploy(cider, min_cider, champion_cider)


@component
def deploy(repository: Input[Artifact], serving_uri: str, cider: float, triton_url: str, target: str,
           kserve: dict) -> str:
    import json

    from captioner.pipeline.steps import deploy_step

    return json.dumps(deploy_step(repository.metadata["repo_uri"], serving_uri, cider, triton_url, target=target,
                                  kserve=dict(kserve)))
