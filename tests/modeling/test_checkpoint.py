"""The checkpoint format: no pickle (a hostile file runs nothing), resume from the model
store, and a run is never replaced by accident."""
import json
import os
import subprocess
import sys

import pytest
import torch

from captioner.modeling.checkpoint import CheckpointError, load_checkpoint, load_raw

ENV = {**os.environ}


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what an attacker ships: code that runs when the file is unpickled
        return (os.system, (f"touch {self.marker}",))


def _hostile_checkpoint(path, marker):
    """A real torch checkpoint (zip) whose pickle calls os.system on load."""
    torch.save({"config": {}, "model": {}, "tokenizer": "", "preprocess": {}, "step": 1,
                "rng": [_Payload(marker)]}, path)


@pytest.mark.parametrize("how", ["load_checkpoint", "cli-export", "cli-caption"])
def test_hostile_checkpoint_runs_nothing(tmp_path, how):
    ck, marker = tmp_path / "ckpt_best.pt", tmp_path / "PWNED"
    _hostile_checkpoint(ck, marker)
    if how == "load_checkpoint":
        with pytest.raises(CheckpointError, match=str(ck)) as e:
            load_checkpoint(ck)
        assert "\n" not in str(e.value)
    else:
        cmd = ["export", str(ck), "--out", str(tmp_path / "repo"), "--device", "cpu"] if how == "cli-export" else \
            ["caption", "-c", str(ck), str(tmp_path / "x.jpg")]
        r = subprocess.run([sys.executable, "-m", "captioner", *cmd], capture_output=True, text=True, env=ENV)
        assert r.returncode != 0
        assert str(ck) in r.stderr and "weights_only" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists(), "the checkpoint's payload ran"


def test_not_a_checkpoint_is_one_line(tmp_path):
    p = tmp_path / "results.csv"
    p.write_text("image|caption\n")
    with pytest.raises(CheckpointError, match="results.csv"):
        load_raw(p)
    z = tmp_path / "list.pt"
    torch.save([1, 2, 3], z)
    with pytest.raises(CheckpointError, match="not a captioner checkpoint"):
        load_raw(z)


def test_training_checkpoint_loads_without_pickle(trained_run):
    raw = torch.load(trained_run.out_dir / "ckpt_latest.pt", weights_only=True)  # raises on any pickled object
    assert {"torch", "numpy", "python"} <= set(raw["rng"][0]) and raw["format"] == 2


def _train(args, check=True):
    r = subprocess.run([sys.executable, "-m", "captioner", "train", "--no-progress", *args], capture_output=True,
                       text=True, env=ENV)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _args(synth_dir, out, store, *extra):
    from tests.helpers import TINY

    return ["--config", "tiny-cpu", *TINY, f"--data.source={synth_dir}", f"--train.out_dir={out}",
            f"--train.publish_uri={store}", "--train.val_max_images=0", "--train.ckpt_every=2", *extra]


def _snapshot(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_rerun_into_an_existing_run_is_refused_and_the_run_is_untouched(synth_dir, tmp_path):
    out, store = tmp_path / "run", tmp_path / "store"
    _train(_args(synth_dir, out, store, "--train.max_steps=2"))
    before_out, before_store = _snapshot(out), _snapshot(store)
    r = _train(_args(synth_dir, out, store, "--train.max_steps=2"), check=False)
    assert r.returncode == 2 and "already holds a training run" in r.stderr and "--resume" in r.stderr
    assert "Traceback" not in r.stderr
    assert _snapshot(out) == before_out and _snapshot(store) == before_store
    # a fresh local folder, but the model store holds the run: refused too
    r = _train(_args(synth_dir, tmp_path / "other", store, "--train.max_steps=2"), check=False)
    assert r.returncode == 2 and str(store) in r.stderr and _snapshot(store) == before_store
    _train(_args(synth_dir, out, store, "--train.max_steps=2", "--overwrite"))  # asked for: replaced
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resume_from_the_model_store_after_the_pod_lost_its_disk(synth_dir, tmp_path):
    """A pod killed after its step-4 checkpoint restarts with an empty local folder: --resume
    continues from the store's checkpoint and ends with an uninterrupted run's weights."""
    store_a, store_b = tmp_path / "a", tmp_path / "b"
    _train(_args(synth_dir, tmp_path / "full", store_a, "--train.max_steps=8"))
    cmd = [sys.executable, "-m", "captioner", "train", "--no-progress",
           *_args(synth_dir, tmp_path / "pod1", store_b, "--train.max_steps=8")]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if "checkpoint saved" in line and "(step 4)" in line:
            p.kill()
            break
    p.wait()
    assert torch.load(store_b / "ckpt_latest.pt", weights_only=True)["step"] < 8, "must be cut before the end"
    r = _train(_args(synth_dir, tmp_path / "pod2", store_b, "--train.max_steps=8", "--resume"))
    assert "fetched ckpt_latest.pt from the model store" in r.stderr
    wa = torch.load(store_a / "ckpt_latest.pt", weights_only=True)
    wb = torch.load(store_b / "ckpt_latest.pt", weights_only=True)
    assert wa["step"] == wb["step"] == 8
    for k in wa["model"]:
        torch.testing.assert_close(wa["model"][k], wb["model"][k], rtol=1e-5, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (store_b / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_resume_refuses_another_runs_checkpoint(synth_dir, tmp_path):
    store = tmp_path / "store"
    _train(_args(synth_dir, tmp_path / "r1", store, "--train.max_steps=2", "--train.run_id=job-a"))
    r = _train(_args(synth_dir, tmp_path / "r2", store, "--train.max_steps=2", "--train.run_id=job-b", "--resume"),
               check=False)
    assert r.returncode == 2 and "belongs to run 'job-a'" in r.stderr
