"""The KFP pipeline: compiled IR asserted on, and a whole local run."""
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from captioner.pipeline import steps
from tests.helpers import start_serve

ROOT = Path(__file__).resolve().parents[2]

TINY_TRAIN = ["--model.encoder_kwargs={output_stride: 16, pretrained_cfg_overlay: {input_size: [3, 32, 32]}}",
              "--model.d_model=32", "--model.n_layers=1", "--model.n_heads=2", "--data.num_workers=0",
              "--train.epochs=2", "--train.batch_size=8", "--train.val_max_images=8", "--train.warmup_steps=4"]


def _compile(path, *flags):
    r = subprocess.run([sys.executable, "-m", "captioner", "pipeline", "compile", str(path), *flags],
                       capture_output=True, text=True, env=os.environ.copy())
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(path.read_text()))
    platform = next(d for d in docs if "platforms" in d)["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return docs[0], platform


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The IR for a cluster: the train task launches and watches a PyTorchJob."""
    return _compile(tmp_path_factory.mktemp("kfp") / "pipeline.yaml")


@pytest.fixture(scope="module")
def compiled_in_pod(tmp_path_factory):
    """The IR with training inside the pipeline's own GPU pod."""
    return _compile(tmp_path_factory.mktemp("kfp") / "pipeline.yaml", "--train-in-pod")


def test_tasks_and_artifact_types(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert {"ingest", "train", "evaluate", "export", "champion", "gate", "condition-1"} <= set(tasks)
    comps = spec["components"]
    def outs(name):
        return {k: v["artifactType"]["schemaTitle"] for k, v in comps[name]["outputDefinitions"].get("artifacts", {}).items()}
    assert outs("comp-ingest") == {"dataset": "system.Dataset"}
    assert outs("comp-train") == {"model": "system.Model"}
    # the training run's report (curves as embedded images) and numbers for the run comparison
    assert outs("comp-evaluate") == {"metrics": "system.Metrics", "samples": "system.HTML", "report": "system.HTML",
                                     "training": "system.Metrics"}
    assert outs("comp-export") == {"repository": "system.Artifact"}
    assert comps["comp-evaluate"]["outputDefinitions"]["parameters"]["cider"]["parameterType"] == "NUMBER_DOUBLE"
    # deploy sits inside the quality-gate condition on the gate's output
    cond = tasks["condition-1"]
    assert "== true" in cond["triggerPolicy"]["condition"] and "gate" in cond["triggerPolicy"]["condition"]
    inner = comps[cond["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"deploy"}


def test_retry_and_caching(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["train"]["retryPolicy"]["backoffDuration"] == "60s"
    cache = {k: v.get("cachingOptions", {}).get("enableCache", False) for k, v in tasks.items() if k != "condition-1"}
    assert cache == {"ingest": True, "train": False, "evaluate": True, "export": True, "champion": False,
                     "gate": False}


# ---- checks on the compiled IR, one per way a compiled pipeline failed on a cluster (each takes (spec, platform))
def check_s3_secret_required_everywhere(spec, platform):
    """Every step gets the S3 settings from the Secret, and not optionally (a
    missing Secret must stop the pod with its name, not fail later with "no S3 endpoint")."""
    from captioner.core.deployment import S3_ENV, S3_SECRET

    for ex in set(spec["deploymentSpec"]["executors"]) - {"exec-gate"}:  # the gate only compares numbers
        sae = [s for s in platform.get(ex, {}).get("secretAsEnv", []) if s["secretName"] == S3_SECRET]
        assert len(sae) == 1, f"{ex}: no {S3_SECRET} Secret as env"
        assert sae[0].get("optional") is False, f"{ex}: the S3 Secret must not be optional on the cluster"
        assert {e["envVar"]: e["secretKey"] for e in sae[0]["keyToEnv"]} == {v: k for k, v in S3_ENV.items()}


def check_train_run_id_is_the_pipeline_job_id(spec, platform):
    """The launcher sets only KFP_POD_NAME/KFP_POD_UID (backend/src/v2/component/
    constants.go), which change on every retry; the job id must come from the placeholder."""
    from kfp import dsl

    run_id = spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"].get("run_id", {})
    assert run_id.get("runtimeValue", {}).get("constant") == dsl.PIPELINE_JOB_ID_PLACEHOLDER, run_id
    code = " ".join(spec["deploymentSpec"]["executors"]["exec-train"]["container"]["command"])
    assert "KFP_RUN_ID" not in code and "HOSTNAME" not in code


def _quantity(q: str) -> float:
    units = {"m": 1e-3, "K": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for u in sorted(units, key=len, reverse=True):
        if q.endswith(u):
            return float(q[: -len(u)]) * units[u]
    return float(q)


def check_watcher_is_a_small_cpu_task(spec, platform):
    """Launching and watching the PyTorchJob needs no GPU and little CPU/memory."""
    res = spec["deploymentSpec"]["executors"]["exec-train"]["container"].get("resources", {})
    assert "accelerator" not in res, "the watcher asks for a GPU"
    assert _quantity(res["resourceCpuLimit"]) <= 1 and _quantity(res["resourceMemoryLimit"]) <= 4 * 2**30, res
    assert "nodeSelector" not in platform.get("exec-train", {}) and "tolerations" not in platform.get("exec-train", {})


def check_no_runtime_pip_install(spec, platform):
    """No component installs packages when it starts (the cluster may have no package index to reach)."""
    for name, ex in spec["deploymentSpec"]["executors"].items():
        text = " ".join(ex["container"].get("command", []) + ex["container"].get("args", []))
        assert "pip install" not in text and "pip3 install" not in text, f"{name} installs packages at start"


IR_CHECKS = [check_s3_secret_required_everywhere, check_train_run_id_is_the_pipeline_job_id,
             check_watcher_is_a_small_cpu_task, check_no_runtime_pip_install]


@pytest.mark.parametrize("check", IR_CHECKS, ids=[c.__name__ for c in IR_CHECKS])
def test_compiled_ir(compiled, check):
    check(*compiled)


def test_train_in_pod_ir_asks_for_the_gpu(compiled_in_pod):
    spec, platform = compiled_in_pod
    res = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "1"
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"].get("resources", {})
    tr = platform["exec-train"]
    assert tr["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert tr["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    assert tr["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi",
                                     "volumeName": "dshm"}]
    for check in (check_s3_secret_required_everywhere, check_train_run_id_is_the_pipeline_job_id,
                  check_no_runtime_pip_install):
        check(spec, platform)


def test_local_pipeline_has_no_secret():
    from kfp import compiler

    from captioner.pipeline.runner import _pipeline

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        compiler.Compiler().compile(_pipeline(cluster=False), f"{d}/p.yaml")
        docs = list(yaml.safe_load_all(open(f"{d}/p.yaml")))
    assert not [x for x in docs if "platforms" in x], "a local run passes no Secret at all"


# Oldest KFP backend release whose driver implements each IR feature we use, read from
# kubeflow/pipelines (git tag --contains of the commit adding it to backend/src/v2/driver):
# emptyDirMounts #10913 (2.3.0); resourceCpuLimit & co. (2.4.0); secretNameParameter and the
# {{$.pipeline_job_uuid}} runtime constant #11599 (2.5.0); the rest are in 2.0/2.1.
BACKEND_FEATURES = {
    "platform:secretAsEnv": "2.0.0", "platform:secretAsEnv.optional": "2.0.0", "platform:nodeSelector": "2.0.0",
    "platform:tolerations": "2.1.0", "platform:emptyDirMounts": "2.3.0", "platform:secretAsEnv.secretNameParameter":
    "2.5.0", "resources:resourceCpuLimit": "2.4.0", "resources:resourceCpuRequest": "2.4.0",
    "resources:resourceMemoryLimit": "2.4.0", "resources:resourceMemoryRequest": "2.4.0",
    "resources:accelerator": "2.0.0", "resources:cpuLimit": "2.0.0", "resources:cpuRequest": "2.0.0",
    "resources:memoryLimit": "2.0.0", "resources:memoryRequest": "2.0.0", "placeholder:{{$.pipeline_job_uuid}}": "2.5.0",
}


def _features(spec, platform) -> set[str]:
    f = set()
    for ex in platform.values():
        for k, v in ex.items():
            f.add(f"platform:{k}")
            if k == "secretAsEnv":
                f |= {f"platform:secretAsEnv.{kk}" for s in v for kk in s if kk not in ("secretName", "keyToEnv")}
    for ex in spec["deploymentSpec"]["executors"].values():
        f |= {f"resources:{k}" for k in ex["container"].get("resources", {})}
    f |= {f"placeholder:{m}" for m in re.findall(r"\{\{\$\.pipeline_[a-z_]+\}\}", json.dumps(spec))}
    return f


def test_minimum_kfp_backend_is_documented(compiled, compiled_in_pod):
    from captioner.core.deployment import MIN_KFP_BACKEND

    used = _features(*compiled) | _features(*compiled_in_pod)
    unknown = used - set(BACKEND_FEATURES)
    assert not unknown, f"classify these IR features by the first KFP backend that supports them: {unknown}"
    need = max((BACKEND_FEATURES[x] for x in used), key=lambda v: tuple(map(int, v.split("."))))
    assert MIN_KFP_BACKEND == need, f"the IR needs KFP backend >= {need}, deployment says {MIN_KFP_BACKEND}"
    assert f"Kubeflow Pipelines backend {MIN_KFP_BACKEND}" in (ROOT / "README.md").read_text()
    import kfp

    docker = (ROOT / "docker" / "trainer.Dockerfile").read_text()
    assert f"kfp=={kfp.__version__}" in docker, "the trainer image must pin the kfp that compiled the IR"


@pytest.mark.slow
def test_local_pipeline_run_skips_deploy_below_gate_and_serves(synth_dir, tmp_path):
    from captioner.serving.client import caption_bytes
    from captioner.pipeline.runner import local_arguments, run_local

    args = local_arguments(tmp_path / "w", synth_dir, "tiny-cpu", TINY_TRAIN, min_cider=100.0,
                           val_fraction=0.15, test_fraction=0.15, shard_mb=0.05)
    run_local(args, tmp_path / "root")
    root = next((tmp_path / "root").iterdir())
    ran = {p.name for p in root.iterdir()}
    assert {"ingest", "train", "evaluate", "export", "champion", "gate"} <= ran
    assert "deploy" not in ran, "CIDEr is below the gate: deploy must be skipped"
    gate_out = json.loads((root / "gate" / "executor_output.json").read_text())
    assert gate_out["parameterValues"]["Output"] is False
    ev = json.loads((root / "evaluate" / "executor_output.json").read_text())
    metrics = ev["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert {"BLEU-4", "CIDEr", "ROUGE-L"} <= set(metrics)
    html = next((root / "evaluate").rglob("samples*"))
    assert "<img src='data:image/jpeg;base64," in html.read_text()
    training = ev["artifacts"]["training"]["artifacts"][0]["metadata"]
    assert {"train_loss", "val_loss", "pairs_per_s_per_gpu", "cost_usd_measured"} <= set(training), training
    report = next((root / "evaluate").rglob("report*")).read_text()
    assert report.count("<img class='curve' alt=") >= 4 and "id='worst'" in report
    assert json.loads(next((root / "ingest").rglob("dataset")).read_text())["items"] > 0
    assert (tmp_path / "w" / "model" / "ckpt_best.pt").exists()
    assert not (tmp_path / "w" / "serving").exists()
    # the exported repository serves through tritonclient
    p, url = start_serve(args["repo_uri"], tmp_path / "serve.log")
    try:
        img = sorted((synth_dir / "flickr30k_images").glob("*.jpg"))[0].read_bytes()
        assert caption_bytes(url, [img])[0]
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_champion_challenger_gate_and_deploy(exported_repo, tmp_path):
    repo, _ = exported_repo
    serving = tmp_path / "serving"
    assert steps.champion_score(str(serving)) == -1.0
    assert steps.should_deploy(0.8, 0.5, -1.0)
    assert not steps.should_deploy(0.4, 0.5, -1.0)  # below the minimum
    r = steps.deploy_step(str(repo), str(serving), 0.8)
    assert (serving / "captioner" / "config.pbtxt").exists() and not r["triton_loaded"]
    assert steps.champion_score(str(serving)) == 0.8
    assert not steps.should_deploy(0.7, 0.5, steps.champion_score(str(serving)))  # worse than the champion
    assert steps.should_deploy(0.9, 0.5, steps.champion_score(str(serving)))


def test_champion_on_s3(exported_repo, s3_server, monkeypatch):
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    repo, _ = exported_repo
    steps.deploy_step(str(repo), "s3://serving/captioner", 1.25)
    assert steps.champion_score("s3://serving/captioner") == 1.25
    from captioner.io.storage import open_store

    keys = open_store("s3://serving/captioner").list()
    assert "captioner/config.pbtxt" in keys and "decoder/1/model.onnx" in keys


HOST_URIS = ["--source", "s3://raw/flickr30k", "--data-uri", "s3://datasets/flickr30k/v1", "--model-uri",
             "s3://models/runs/r1", "--repo-uri", "s3://models/repos/r1", "--serving-uri", "s3://models/serving"]


def test_pipeline_run_host_passes_every_setting_and_credentials(tmp_path):
    """`pipeline run --host` against a recording KFP API stand-in: the profile namespace, the
    token and cookie as kfp.Client sends them, and every setting as a run parameter."""
    from tests.pipeline.kfp_api_double import KfpApiDouble

    with KfpApiDouble() as api:
        env = {**os.environ, "HOME": str(tmp_path), "KF_PIPELINES_TOKEN": "tok-123",
               "KF_PIPELINES_COOKIES": "authservice_session=abc"}
        r = subprocess.run([sys.executable, "-m", "captioner", "pipeline", "run", "--host", api.url, "--namespace",
                            "team-a", *HOST_URIS, "--config", "vit-b16-a100", "--export-device", "cpu",
                            "--triton-url", "triton.captioner:8001", "--workers", "3", "--gpus-per-worker", "4",
                            "--cloud", "eks", "--max-cost", "900", "--min-cider", "0.7", "--shard-mb", "128",
                            "--train.epochs=7"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("run-1")
    runs = [q for q in api.requests if q["method"] == "POST" and q["path"] == "/apis/v2beta1/runs"]
    assert len(runs) == 1
    assert all(q["headers"].get("authorization") == "Bearer tok-123" for q in api.requests)
    assert all(q["headers"].get("cookie") == "authservice_session=abc" for q in api.requests)
    exp = next(q for q in api.requests if q["method"] == "POST" and q["path"] == "/apis/v2beta1/experiments")
    assert exp["body"]["namespace"] == "team-a"
    params = runs[0]["body"]["runtime_config"]["parameters"]
    assert params["source"] == "s3://raw/flickr30k" and params["serving_uri"] == "s3://models/serving"
    assert params["export_device"] == "cpu" and params["triton_url"] == "triton.captioner:8001"
    assert params["config"] == "vit-b16-a100" and params["overrides"] == ["--train.epochs=7"]
    assert params["min_cider"] == 0.7 and params["shard_mb"] == 128
    assert params["cluster_settings"] == {"workers": 3, "gpus_per_worker": 4, "cloud": "eks", "max_cost": 900.0}
    spec = runs[0]["body"]["pipeline_spec"]
    spec = spec.get("pipeline_spec", spec)  # with a platform spec, the IR is nested
    assert spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]["mode"]["runtimeValue"]["constant"] == \
        "cluster"


@pytest.mark.parametrize("flag", ["--source", "--model-uri"])
def test_pipeline_run_host_refuses_local_paths(flag, tmp_path):
    args = list(HOST_URIS)
    args[args.index(flag) + 1] = str(tmp_path)
    r = subprocess.run([sys.executable, "-m", "captioner", "pipeline", "run", "--host", "http://127.0.0.1:9", *args],
                       capture_output=True, text=True, env=os.environ.copy())
    assert r.returncode == 2 and "must be an s3://bucket/prefix URI" in r.stderr and flag in r.stderr, r.stderr


def test_ingest_step_reads_a_raw_dataset_from_the_store(synth_dir, s3_server, monkeypatch, tmp_path):
    """--source s3://...: the raw dataset uploaded to the store is ingested from there."""
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    from captioner.io.storage import publish

    publish(synth_dir, "s3://raw-src/synth")
    r = steps.ingest_step("s3://raw-src/synth", str(tmp_path / "ds"), shard_mb=0.05)
    assert r["items"] > 0 and (tmp_path / "ds" / "manifest.json").exists()


def test_train_step_refuses_an_unresolved_job_id(tmp_path):
    """On a KFP backend older than MIN_KFP_BACKEND the placeholder arrives verbatim: every run
    would share one job name and one checkpoint owner, so the step stops instead."""
    from kfp import dsl

    with pytest.raises(ValueError, match="older than 2.5.0"):
        steps.train_step(str(tmp_path), str(tmp_path / "m"), "tiny-cpu", [], run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
