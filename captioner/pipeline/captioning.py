"""The captioning pipeline: ingest -> train -> evaluate -> export -> (quality gate) deploy.

`build_pipeline` makes the two shapes, decided at compile time because the resources a
task asks for are fixed in the IR:
- for a Kubeflow cluster (`captioner pipeline compile` / `run --host`): every step reads
  the S3 settings from the `captioner-s3` Secret (not optional: a missing Secret stops the
  pod at start with the Secret's name instead of failing later without an endpoint), and
  the train step is either a small CPU task that launches and watches a PyTorchJob (the
  GPUs are requested by the job) or, with train_in_pod, one GPU pod that trains itself;
- for this machine (`captioner pipeline run --local`, kfp.local): no Secret, train in-process.
The KFP job id (dsl.PIPELINE_JOB_ID_PLACEHOLDER) names the training run, so a retry of
the train task re-attaches to its PyTorchJob and resumes from its checkpoints.
"""
from kfp import dsl, kubernetes

from captioner.core.deployment import (CONTROL_KEY_ENV, CONTROL_SECRET, CONTROL_SECRET_KEY, GPU_NODE_SELECTOR,
                                       GPU_TOLERATION, S3_ENV, S3_SECRET)
from captioner.pipeline import components as c


def _s3(task, cluster: bool):
    if cluster:
        kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_ENV, optional=False)
    return task


def build_pipeline(cluster: bool = True, train_in_pod: bool = False):
    """cluster: compile for Kubeflow (Secrets, node pools); train_in_pod: the train task
    trains on its own GPU instead of launching a PyTorchJob (always so for local runs)."""
    in_pod = train_in_pod or not cluster

    @dsl.pipeline(name="captioner", description="Image captioning: ingest, train, evaluate, export to Triton, deploy")
    def captioning_pipeline(
        source: str,
        data_uri: str,
        model_uri: str,
        repo_uri: str,
        serving_uri: str,
        config: str = "tiny-cpu",
        overrides: list = [],  # noqa: B006 - KFP pipeline parameter default
        nproc: int = 1,
        cluster_settings: dict = {},  # noqa: B006 - PyTorchJob size, cost guard, image, namespace
        shard_mb: float = 64.0,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        eval_max_images: int = 0,
        export_device: str = "gpu",
        min_cider: float = 0.5,
        triton_url: str = "",
        deploy_target: str = "triton",  # triton: the Deployment's explicit loads; kserve: InferenceService canary
        kserve_settings: dict = {},  # noqa: B006 - canary_percent, name, namespace, live_url, ...
    ):
        ing = c.ingest(source=source, dest=data_uri, shard_mb=shard_mb, val_fraction=val_fraction,
                       test_fraction=test_fraction)
        ing.set_caching_options(True).set_cpu_limit("4").set_memory_limit("8G")
        _s3(ing, cluster)

        tr = c.train(dataset=ing.outputs["dataset"], model_uri=model_uri, config=config, overrides=overrides,
                     mode="local" if in_pod else "cluster", nproc=nproc, cluster=cluster_settings,
                     run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        tr.set_caching_options(False)
        if cluster:  # a preempted or evicted pod; here a failure would only repeat (kfp.local retries it too)
            tr.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0)
        _s3(tr, cluster)
        if not in_pod:  # launches and watches the PyTorchJob for hours: a small CPU task
            tr.set_cpu_request("250m").set_cpu_limit("1").set_memory_request("512M").set_memory_limit("2G")
        elif cluster:
            tr.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1).set_cpu_limit("8")
            tr.set_memory_limit("32G")
            kubernetes.add_node_selector(tr, *GPU_NODE_SELECTOR)
            kubernetes.add_toleration(tr, **GPU_TOLERATION)
            kubernetes.empty_dir_mount(tr, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit="16Gi")

        ev = c.evaluate(dataset=ing.outputs["dataset"], model=tr.outputs["model"], max_images=eval_max_images)
        ev.set_caching_options(True)
        _s3(ev, cluster)

        ex = c.export(model=tr.outputs["model"], repo_uri=repo_uri, device=export_device)
        ex.set_caching_options(True)
        _s3(ex, cluster)

        ch = c.champion(serving_uri=serving_uri)
        ch.set_caching_options(False)  # the deployed model changes between runs
        _s3(ch, cluster)

        g = c.gate(cider=ev.outputs["cider"], min_cider=min_cider, champion_cider=ch.output)
        g.set_caching_options(False)
        with dsl.If(g.output == True, name="quality-gate"):  # noqa: E712 - KFP condition syntax
            dep = c.deploy(repository=ex.outputs["repository"], serving_uri=serving_uri, cider=ev.outputs["cider"],
                           triton_url=triton_url, target=deploy_target, kserve=kserve_settings)
            dep.set_caching_options(False)
            _s3(dep, cluster)
            if cluster:  # the key for Triton's restricted model-repository protocol (a local run passes it as env)
                kubernetes.use_secret_as_env(dep, secret_name=CONTROL_SECRET,
                                             secret_key_to_env={CONTROL_SECRET_KEY: CONTROL_KEY_ENV}, optional=False)

    return captioning_pipeline


captioning_pipeline = build_pipeline(cluster=True)
