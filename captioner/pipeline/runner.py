"""`captioner pipeline compile|run`: compile the Kubeflow pipeline to IR YAML, run it on this
machine with kfp.local.SubprocessRunner, or submit it to a Kubeflow Pipelines endpoint."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


def _pipeline(cluster: bool = True, train_in_pod: bool = False):
    # `pipelines` and `components` are packages of this distribution (pyproject.toml), importable
    # wherever `captioner` is: no sys.path or PYTHONPATH patching
    from captioner.pipeline.captioning import build_pipeline

    return build_pipeline(cluster=cluster, train_in_pod=train_in_pod)


def compile_pipeline(out: str, train_in_pod: bool = False) -> str:
    """The IR for a Kubeflow cluster (needs a KFP backend >= deployment.MIN_KFP_BACKEND)."""
    from kfp import compiler

    compiler.Compiler().compile(_pipeline(True, train_in_pod), out)
    log.info("wrote %s", out)
    return out


def local_arguments(workdir: str | Path, source: str, config: str = "tiny-cpu", overrides: list[str] | None = None,
                    min_cider: float = 0.5, **extra) -> dict:
    """Pipeline arguments for a laptop run: every URI is a folder under workdir."""
    wd = Path(workdir).resolve()
    return {"source": str(source), "data_uri": str(wd / "data"), "model_uri": str(wd / "model"),
            "repo_uri": str(wd / "model_repository"), "serving_uri": str(wd / "serving"), "config": config,
            "overrides": list(overrides or []), "export_device": "cpu", "min_cider": min_cider, **extra}


def host_arguments(source: str, data_uri: str, model_uri: str, repo_uri: str, serving_uri: str, **settings) -> dict:
    """Pipeline arguments for a cluster run: every location must be an s3:// URI, because a
    path on this machine does not exist inside the pipeline's pods."""
    from captioner.io.storage import is_s3

    uris = {"source": source, "data_uri": data_uri, "model_uri": model_uri, "repo_uri": repo_uri,
            "serving_uri": serving_uri}
    for k, v in uris.items():
        if not v or not is_s3(v):
            raise ValueError(f"pipeline run --host: --{k.replace('_uri', '-uri')} must be an s3://bucket/prefix URI "
                             f"(got {v!r}); a path on this machine is not visible inside the cluster"
                             + ("; upload the dataset first, e.g. with `captioner ingest` or `mc cp -r`"
                                if k == "source" else ""))
    return {**uris, **{k: v for k, v in settings.items() if v is not None}}


def run_local(arguments: dict, pipeline_root: str | Path):
    """Run the whole pipeline here; returns the pipeline task (outputs) and the root."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    return _pipeline(cluster=False)(**arguments)


def kfp_client(host: str, namespace: str | None = None, existing_token: str | None = None,
               cookies: str | None = None, ssl_ca_cert: str | None = None):
    """kfp.Client the way multi-user Kubeflow needs it: the profile namespace, and a bearer
    token (e.g. a ServiceAccount token) or the session cookie (`authservice_session=...`)."""
    import kfp

    return kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=existing_token or None,
                      cookies=cookies or None, ssl_ca_cert=ssl_ca_cert or None)


def run_host(host: str, arguments: dict, experiment: str = "captioner", run_name: str | None = None,
             namespace: str | None = None, existing_token: str | None = None, cookies: str | None = None,
             ssl_ca_cert: str | None = None, train_in_pod: bool = False, client=None) -> str:
    client = client or kfp_client(host, namespace, existing_token, cookies, ssl_ca_cert)
    run = client.create_run_from_pipeline_func(_pipeline(True, train_in_pod), arguments=arguments,
                                               experiment_name=experiment, run_name=run_name, namespace=namespace)
    log.info("submitted run %s to %s%s", run.run_id, host, f" (namespace {namespace})" if namespace else "")
    return run.run_id
