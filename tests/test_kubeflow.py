"""The KFP pipeline: compiled IR asserted on, and a whole local run."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from captioner import pipeline_steps as steps

from tests.helpers import start_serve

TINY_TRAIN = ["--model.encoder_kwargs={output_stride: 16, pretrained_cfg_overlay: {input_size: [3, 32, 32]}}",
              "--model.d_model=32", "--model.n_layers=1", "--model.n_heads=2", "--data.num_workers=0",
              "--train.epochs=2", "--train.batch_size=8", "--train.val_max_images=8", "--train.warmup_steps=4"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    r = subprocess.run([sys.executable, "-m", "captioner", "pipeline", "compile", str(out)], capture_output=True,
                       text=True, env=os.environ.copy())
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    spec = docs[0]
    platform = next(d for d in docs if "platforms" in d)["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return spec, platform


def test_tasks_and_artifact_types(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert {"ingest", "train", "evaluate", "export", "champion", "gate", "condition-1"} <= set(tasks)
    comps = spec["components"]
    def outs(name):
        return {k: v["artifactType"]["schemaTitle"] for k, v in comps[name]["outputDefinitions"].get("artifacts", {}).items()}
    assert outs("comp-ingest") == {"dataset": "system.Dataset"}
    assert outs("comp-train") == {"model": "system.Model"}
    assert outs("comp-evaluate") == {"metrics": "system.Metrics", "samples": "system.HTML"}
    assert outs("comp-export") == {"repository": "system.Artifact"}
    assert comps["comp-evaluate"]["outputDefinitions"]["parameters"]["cider"]["parameterType"] == "NUMBER_DOUBLE"
    # deploy sits inside the quality-gate condition on the gate's output
    cond = tasks["condition-1"]
    assert "== true" in cond["triggerPolicy"]["condition"] and "gate" in cond["triggerPolicy"]["condition"]
    inner = comps[cond["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"deploy"}


def test_retry_caching_and_accelerator(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["train"]["retryPolicy"]["backoffDuration"] == "60s"
    cache = {k: v.get("cachingOptions", {}).get("enableCache", False) for k, v in tasks.items() if k != "condition-1"}
    assert cache == {"ingest": True, "train": False, "evaluate": True, "export": True, "champion": False,
                     "gate": False}
    res = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "1"
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"].get("resources", {})


def test_kubernetes_platform_spec(compiled):
    _, platform = compiled
    tr = platform["exec-train"]
    env = {e["envVar"]: e["secretKey"] for e in tr["secretAsEnv"][0]["keyToEnv"]}
    assert tr["secretAsEnv"][0]["secretName"] == "captioner-s3"
    assert env == {"CAPTIONER_S3_ENDPOINT": "endpoint", "AWS_ACCESS_KEY_ID": "access-key",
                   "AWS_SECRET_ACCESS_KEY": "secret-key"}
    assert tr["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert tr["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    assert tr["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi",
                                     "volumeName": "dshm"}]
    for ex in ("exec-ingest", "exec-evaluate", "exec-export", "exec-deploy"):
        assert platform[ex]["secretAsEnv"][0]["secretName"] == "captioner-s3"


@pytest.mark.slow
def test_local_pipeline_run_skips_deploy_below_gate_and_serves(synth_dir, tmp_path):
    from captioner.client import caption_bytes
    from captioner.kfp_pipeline import local_arguments, run_local

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
    from captioner.storage import open_store

    keys = open_store("s3://serving/captioner").list()
    assert "captioner/config.pbtxt" in keys and "decoder/1/model.onnx" in keys
