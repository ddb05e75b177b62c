"""The captioning pipeline: ingest -> train -> evaluate -> export -> (quality gate) deploy.

The same pipeline runs on a Kubeflow cluster (`captioner pipeline compile` / `run --host`)
and on a laptop (`captioner pipeline run --local`, kfp.local.SubprocessRunner).
"""
from kfp import dsl, kubernetes

import components as c
from captioner.deployment import CONTROL_KEY_ENV, CONTROL_SECRET, CONTROL_SECRET_KEY

S3_SECRET = "captioner-s3"
S3_ENV = {"endpoint": "CAPTIONER_S3_ENDPOINT", "access-key": "AWS_ACCESS_KEY_ID", "secret-key": "AWS_SECRET_ACCESS_KEY"}
GPU_NODE_SELECTOR = ("cloud.google.com/gke-accelerator", "nvidia-tesla-a100")


def _s3(task):
    # optional: a laptop run has no secret; on the cluster the secret supplies the store
    return kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_ENV, optional=True)


@dsl.pipeline(name="captioner", description="Image captioning: ingest, train, evaluate, export to Triton, deploy")
def captioning_pipeline(
    source: str,
    data_uri: str,
    model_uri: str,
    repo_uri: str,
    serving_uri: str,
    config: str = "tiny-cpu",
    overrides: list = [],  # noqa: B006 - KFP pipeline parameter default
    train_mode: str = "local",
    nproc: int = 1,
    cluster: dict = {},  # noqa: B006
    shard_mb: float = 64.0,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    eval_max_images: int = 0,
    export_device: str = "gpu",
    min_cider: float = 0.5,
    triton_url: str = "",
):
    ing = c.ingest(source=source, dest=data_uri, shard_mb=shard_mb, val_fraction=val_fraction,
                   test_fraction=test_fraction)
    ing.set_caching_options(True).set_cpu_limit("4").set_memory_limit("8G")
    _s3(ing)

    tr = c.train(dataset=ing.outputs["dataset"], model_uri=model_uri, config=config, overrides=overrides,
                 mode=train_mode, nproc=nproc, cluster=cluster)
    tr.set_caching_options(False).set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0)
    tr.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1).set_cpu_limit("8").set_memory_limit("32G")
    _s3(tr)
    kubernetes.add_node_selector(tr, *GPU_NODE_SELECTOR)
    kubernetes.add_toleration(tr, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    kubernetes.empty_dir_mount(tr, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit="16Gi")

    ev = c.evaluate(dataset=ing.outputs["dataset"], model=tr.outputs["model"], max_images=eval_max_images)
    ev.set_caching_options(True)
    _s3(ev)

    ex = c.export(model=tr.outputs["model"], repo_uri=repo_uri, device=export_device)
    ex.set_caching_options(True)
    _s3(ex)

    ch = c.champion(serving_uri=serving_uri)
    ch.set_caching_options(False)  # the deployed model changes between runs
    _s3(ch)

    g = c.gate(cider=ev.outputs["cider"], min_cider=min_cider, champion_cider=ch.output)
    g.set_caching_options(False)
    with dsl.If(g.output == True, name="quality-gate"):  # noqa: E712 - KFP condition syntax
        dep = c.deploy(repository=ex.outputs["repository"], serving_uri=serving_uri, cider=ev.outputs["cider"],
                       triton_url=triton_url)
        dep.set_caching_options(False)
        _s3(dep)
        # the key for Triton's restricted model-repository protocol (optional: a laptop run has
        # no secret and passes it in the environment)
        kubernetes.use_secret_as_env(dep, secret_name=CONTROL_SECRET,
                                     secret_key_to_env={CONTROL_SECRET_KEY: CONTROL_KEY_ENV}, optional=True)
