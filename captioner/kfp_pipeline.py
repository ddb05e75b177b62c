"""`captioner pipeline compile|run`: compile the Kubeflow pipeline to IR YAML, run it on this
machine with kfp.local.SubprocessRunner, or submit it to a Kubeflow Pipelines endpoint."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


def _pipeline():
    # `pipelines` and `components` are packages of this distribution (pyproject.toml), importable
    # wherever `captioner` is: no sys.path or PYTHONPATH patching
    from pipelines.captioning import captioning_pipeline

    return captioning_pipeline


def compile_pipeline(out: str) -> str:
    from kfp import compiler

    compiler.Compiler().compile(_pipeline(), out)
    log.info("wrote %s", out)
    return out


def local_arguments(workdir: str | Path, source: str, config: str = "tiny-cpu", overrides: list[str] | None = None,
                    min_cider: float = 0.5, **extra) -> dict:
    """Pipeline arguments for a laptop run: every URI is a folder under workdir."""
    wd = Path(workdir).resolve()
    return {"source": str(source), "data_uri": str(wd / "data"), "model_uri": str(wd / "model"),
            "repo_uri": str(wd / "model_repository"), "serving_uri": str(wd / "serving"), "config": config,
            "overrides": list(overrides or []), "train_mode": "local", "export_device": "cpu",
            "min_cider": min_cider, **extra}


def run_local(arguments: dict, pipeline_root: str | Path):
    """Run the whole pipeline here; returns the pipeline task (outputs) and the root."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    return _pipeline()(**arguments)


def run_host(host: str, arguments: dict, experiment: str = "captioner", run_name: str | None = None) -> str:
    import kfp

    client = kfp.Client(host=host)
    run = client.create_run_from_pipeline_func(_pipeline(), arguments=arguments, experiment_name=experiment,
                                               run_name=run_name)
    log.info("submitted run %s to %s", run.run_id, host)
    return run.run_id
