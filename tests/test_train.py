import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY, tiny_cfg

from captioner.checkpoint import load_checkpoint


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicate or unordered steps in {run}: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def test_training_run_writes_self_describing_checkpoints(trained_run):
    run = trained_run.out_dir
    for f in ("ckpt_latest.pt", "ckpt_best.pt", "config.yaml", "tokenizer.json", "metrics.jsonl",
              "val_metrics.jsonl", "data_summary.json"):
        assert (run / f).exists(), f
    ck = load_checkpoint(run)
    assert ck.path.name == "ckpt_best.pt" and ck.step > 0
    assert ck.config.model.vocab_size == ck.tokenizer.vocab_size
    assert ck.preprocess.input_size == (3, 32, 32)
    losses = list(_losses(run).values())
    assert losses[-1] < losses[0]  # it learns
    val = [json.loads(x) for x in (run / "val_metrics.jsonl").read_text().splitlines()]
    assert len(val) == 3 and all("CIDEr" in v for v in val)
    best = max(v["CIDEr"] for v in val)
    assert ck.raw["best"]["value"] == pytest.approx(best)


def _cmd(data, out, *extra):
    return [sys.executable, "-m", "captioner", "train", "--config", "tiny-cpu", "--no-progress", *TINY,
            f"--data.source={data}", f"--train.out_dir={out}", "--train.max_steps=30", "--train.ckpt_every=5",
            "--train.val_max_images=8", "--model.dropout=0.1", *extra]


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(synth_dir, tmp_path):
    env = {**os.environ}
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_cmd(synth_dir, full), check=True, env=env, capture_output=True)
    p = subprocess.Popen(_cmd(synth_dir, cut), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if "checkpoint saved" in line and "(step 10)" in line:
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL
    killed_at = torch.load(cut / "ckpt_latest.pt", weights_only=False)["step"]
    assert 10 <= killed_at < 30, "the run must be interrupted before it finishes"
    r = subprocess.run(_cmd(synth_dir, cut) + ["--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from" in r.stderr
    a, b = _losses(full), _losses(cut)
    assert list(a) == list(range(1, 31)) and list(b) == list(a)
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-7), f"step {s}: {a[s]} vs {b[s]}"
    wa = torch.load(full / "ckpt_latest.pt", weights_only=False)["model"]
    wb = torch.load(cut / "ckpt_latest.pt", weights_only=False)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "shards"])
def test_ddp_two_ranks_hold_identical_weights(synth_dir, tmp_path, source):
    data = synth_dir
    if source == "shards":  # streamed tar shards: ranks hold different item counts, pad with empty steps
        from captioner.ingest import IngestOptions, ingest

        data = tmp_path / "shards"
        ingest(str(synth_dir), str(data), IngestOptions(shard_mb=0.03, progress=False, val_fraction=0.15,
                                                        test_fraction=0.15))
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "tests.ddp_worker",
                        str(data), str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world 2 backend gloo steps 4" in r.stdout
    w0 = torch.load(tmp_path / "rank0_weights.pt")
    w1 = torch.load(tmp_path / "rank1_weights.pt")
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks disagree on {k}"
    # and training did change them: both ranks applied the same (averaged) updates
    ck = torch.load(tmp_path / "ckpt_latest.pt", weights_only=False)
    assert ck["world_size"] == 2 and ck["step"] == 4 and len(ck["rng"]) == 2
    for k in w0:
        assert torch.equal(ck["model"][k], w0[k])


def test_bad_rows_are_skipped_and_training_goes_on(synth_copy, tmp_path):
    from captioner.train import train

    imgs = sorted((synth_copy / "flickr30k_images").glob("*.jpg"))
    imgs[0].write_bytes(imgs[0].read_bytes()[:200])  # unreadable JPEG
    imgs[1].unlink()  # missing file
    csv = synth_copy / "results.csv"
    csv.write_text(csv.read_text() + f"{imgs[3].name}| 5|   \n")  # empty caption
    res = train(tiny_cfg(synth_copy, tmp_path / "run", "--train.max_steps=3", "--train.val_max_images=0"),
                progress=False)
    assert res.step == 3
    s = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert s["skipped"]["unreadable image"]["items"] == [imgs[0].name]
    assert s["skipped"]["missing image file"]["items"] == [imgs[1].name]
    assert s["skipped"]["empty caption"]["count"] == 1
    assert s["images"] == 78


def test_evaluate_and_caption_cli(trained_run, synth_dir, tmp_path):
    env = {**os.environ}
    r = subprocess.run([sys.executable, "-m", "captioner", "evaluate", str(trained_run.out_dir), "--split", "test",
                        "--out", str(tmp_path / "ev"), "--beam", "2"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(m["metrics"]) and m["split"] == "test"
    assert m["images"] > 0 and m["decode"]["strategy"] == "beam"
    html = (tmp_path / "ev" / "samples.html").read_text()
    assert html.count("<img src='data:image/jpeg;base64,") == m["images"]
    imgs = sorted((synth_dir / "flickr30k_images").glob("*.jpg"))[:2]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    r = subprocess.run([sys.executable, "-m", "captioner", "caption", "-c", str(trained_run.out_dir),
                        *map(str, imgs), str(bad)], capture_output=True, text=True, env=env)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 2 and all(ln.split("\t")[1] for ln in lines)
    assert "bad.jpg" in r.stderr and "not a recognised image format" in r.stderr


def test_metrics_reward_correct_captions():
    from captioner.metrics import caption_metrics

    refs = {"a": ["a red circle on the left", "a small red circle on the left side"],
            "b": ["a blue square at the top", "a big blue square near the top"]}
    good = caption_metrics(refs, {"a": "a red circle on the left", "b": "a blue square at the top"}, meteor=False)
    bad = caption_metrics(refs, {"a": "a blue square at the top", "b": "a red circle on the left"}, meteor=False)
    assert good["CIDEr"] > bad["CIDEr"] + 1 and good["BLEU-4"] > 0.5 > bad["BLEU-4"]
