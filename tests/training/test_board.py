"""Training curves: TensorBoard events of `captioner train` read back with TensorBoard's own
reader, --resume without duplicated steps, and the mirror in the model store read by the
cluster's TensorBoard (the HTML run report built from them: test_report.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from captioner.training import board as tb
from tests.helpers import tiny_cfg


def _acc(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_events_hold_every_scalar_at_every_step(trained_run):
    acc = _acc(trained_run.out_dir / tb.TB_DIR)
    steps = list(range(1, trained_run.step + 1))
    for tag in tb.TRAIN_SCALARS:
        assert [e.step for e in acc.Scalars(tag)] == steps, tag
    assert [v for _, v in trained_run.losses] == pytest.approx([e.value for e in acc.Scalars(tb.LOSS)], rel=1e-6)
    val_steps = [v["step"] for v in trained_run.val_history]
    assert len(val_steps) == 3
    metrics = [k for k in trained_run.val_history[0] if k != "step"]
    assert {"BLEU-4", "CIDEr", "ROUGE-L"} <= set(metrics)
    for tag in [tb.VAL_LOSS, *(tb.VAL_PREFIX + k for k in metrics)]:
        assert [e.step for e in acc.Scalars(tag)] == val_steps, tag
    assert [e.value for e in acc.Scalars(tb.VAL_PREFIX + "CIDEr")] == pytest.approx(
        [v["CIDEr"] for v in trained_run.val_history], rel=1e-6)
    # the same held-out images at every validation, each with its captions as text
    images = [t for t in acc.Tags()["images"] if t.startswith("samples/")]
    assert len(images) == tb.N_SAMPLES
    for t in images:
        ev = acc.Images(t)
        assert [e.step for e in ev] == val_steps and ev[0].width > 0
    texts = acc.Tags()["tensors"]
    assert set(images) <= {t.rsplit("/text_summary", 1)[0] for t in texts}
    cfg = next(t for t in texts if t.startswith(tb.CONFIG_TEXT))
    assert b"vit_tiny_patch16_224" in acc.Tensors(cfg)[0].tensor_proto.string_val[0]


def test_resume_continues_the_series_without_duplicates(synth_dir, tmp_path):
    """A run killed after logging steps past its last checkpoint, restarted on a new node (the
    run folder gone): the events come back from the model store with the checkpoint, and the
    restarted run replaces the steps after it instead of repeating them."""
    from captioner.training.train import train

    store = tmp_path / "store"
    small = ["--data.max_images=40", "--train.val_max_images=4", f"--train.publish_uri={store}"]
    train(tiny_cfg(synth_dir, tmp_path / "a", "--train.epochs=1", *small), progress=False)
    shutil.copy(store / "ckpt_latest.pt", tmp_path / "ckpt_at_epoch_1.pt")
    first = train(tiny_cfg(synth_dir, tmp_path / "a", "--train.epochs=2", *small), resume=True, progress=False)
    # killed before its end-of-run checkpoint reached the store: the store's latest is epoch 1's
    shutil.copy(tmp_path / "ckpt_at_epoch_1.pt", store / "ckpt_latest.pt")
    again = train(tiny_cfg(synth_dir, tmp_path / "b", "--train.epochs=2", *small), resume=True, progress=False)
    assert again.step == first.step
    acc = _acc(tmp_path / "b" / tb.TB_DIR)
    steps = [e.step for e in acc.Scalars(tb.LOSS)]
    assert steps == list(range(1, first.step + 1)), steps
    assert [e.value for e in acc.Scalars(tb.LOSS)][-len(first.losses):] == pytest.approx(
        [v for _, v in first.losses], rel=1e-6)  # the same steps again: the checkpoint holds the data position
    val = [e.step for e in acc.Scalars(tb.VAL_PREFIX + "CIDEr")]
    assert val == sorted(set(val)) and val[-1] == first.step, val
    cost = [e.value for e in acc.Scalars(tb.COST)]
    assert cost == sorted(cost), "the cost clock continues across the restart"
    for t in acc.Tags()["images"]:
        assert [e.step for e in acc.Images(t)] == val, t


def test_cluster_tensorboard_reads_the_runs_with_its_read_only_user(trained_run, s3_server, monkeypatch):
    """k8s/base/tensorboard.yaml as rendered: TensorBoard's own loader (the Python one that
    --load_fast=false selects) finds the run under its --logdir through its S3 reader with the
    Deployment's environment and a MinIO user holding only the rendered captioner-tensorboard
    policy (moto's IAM evaluates it as MinIO does); that user cannot write."""
    import json
    import uuid

    import boto3
    from botocore.exceptions import ClientError

    from captioner.io.storage import publish
    from tests.cluster.test_k8s import render

    docs = render("kind")
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "tensorboard")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    logdir = c["command"][c["command"].index("--logdir") + 1]
    env = {e["name"]: e for e in c["env"]}
    secret = env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"]
    assert ("Secret", secret) in {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert env["S3_ENDPOINT"]["value"].startswith("http://minio.captioner.svc")
    policy = json.loads(next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "minio-policies")
                        ["data"]["captioner-tensorboard.json"])

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    run_uri = f"{logdir}/tiny-{uuid.uuid4().hex[:6]}"
    publish(trained_run.out_dir, run_uri)  # what the trainer mirrors to the store
    url = "http://" + s3_server["CAPTIONER_S3_ENDPOINT"]
    admin = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id=s3_server["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=s3_server["AWS_SECRET_ACCESS_KEY"])
    iam = boto3.client("iam", **admin)
    user = f"tensorboard-{uuid.uuid4().hex[:6]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="captioner-tensorboard", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    # a process with the pod's environment (TensorBoard's S3 reader reads S3_ENDPOINT when it is
    # imported), the test server in place of the in-cluster MinIO
    pod_env = {**os.environ, "S3_ENDPOINT": url, "AWS_REGION": env["AWS_REGION"]["value"],
               "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    read = ("import json, sys\n"
            "from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer\n"
            "m = EventMultiplexer(); m.AddRunsFromDirectory(sys.argv[1]); m.Reload()\n"
            # the store is shared by the session's tests: other runs under --logdir may lack the tag
            "t = sys.argv[2]\n"
            "print(json.dumps({r: [e.step for e in m.Tensors(r, t)] for r, tags in m.Runs().items()\n"
            "                  if t in tags.get('tensors', [])}))\n")
    out = subprocess.run([sys.executable, "-c", read, logdir, tb.LOSS], env=pod_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    run = run_uri[len(logdir) + 1:] + "/" + tb.TB_DIR
    assert runs.get(run) == list(range(1, trained_run.step + 1)), runs
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, pod_env[k])
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    with pytest.raises(ClientError, match="AccessDenied"):
        s3.put_object(Bucket="models", Key=run_uri.split("/", 3)[3] + "/tb/injected", Body=b"x")
