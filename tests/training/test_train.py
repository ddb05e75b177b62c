import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.data.ingest import MANIFEST, ingest
from captioner.io.storage import open_store
from captioner.modeling.checkpoint import load_checkpoint
from tests.helpers import ROOT, TINY, ingest_opts, tiny_cfg


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
        from captioner.data.ingest import IngestOptions, ingest

        data = tmp_path / "shards"
        ingest(str(synth_dir), str(data), IngestOptions(shard_mb=0.03, progress=False, val_fraction=0.15,
                                                        test_fraction=0.15))
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "tests.training.ddp_worker",
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
    from captioner.training.train import train

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


# ------------------------------------------------------------------ uneven inputs, elastic resume


def _torchrun(tmp_path, data, out, *extra, nproc=2, timeout=150, flags=""):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={nproc}", "-m", "tests.training.ddp_worker", str(data), str(out),
           *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "tests.training.ddp_worker", str(data), str(out), *extra]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1", "DDP_WORKER_FLAGS": flags})
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()  # torchrun stops its ranks on SIGTERM (they run in sessions of their own)
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        pytest.fail(f"torchrun did not finish in {timeout}s (ranks out of step?): {(out + err)[-1500:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _batches(out, rank) -> list:
    return [json.loads(x) for x in (Path(out) / f"rank{rank}_batches.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uneven_sets(tmp_path_factory):
    """The two uneven-input cases: 199 images in 0.05 MB shards (173 train items; batch 43 gives the ranks
    2 and 3 batches: a collective mismatch before), and 27 images in one shard (17 train items; batch 8 gives
    1 and 2 batches: a hang before)."""
    from captioner.data.ingest import IngestOptions, ingest
    from captioner.data.synthetic import generate

    root = tmp_path_factory.mktemp("uneven")
    sets = {}
    for name, images, mb, held_out in (("crash", 199, 0.05, 0.05), ("hang", 27, 64.0, 0.15)):
        generate(root / f"{name}_src", images=images, seed=0, side=64, progress=False)
        ingest(str(root / f"{name}_src"), str(root / name),
               IngestOptions(shard_mb=mb, progress=False, val_fraction=held_out, test_fraction=held_out))
        sets[name] = root / name
    return sets


@pytest.mark.slow
@pytest.mark.parametrize("case,extra", [("crash", ["--train.batch_size=43", "--train.max_steps=6"]),
                                        ("hang", ["--train.batch_size=8", "--train.max_steps=3"])])
def test_ddp_padding_steps_keep_ranks_in_step(uneven_sets, tmp_path, case, extra):
    r = _torchrun(tmp_path, uneven_sets[case], tmp_path, "--data.num_workers=0", *extra)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    steps = extra[1].split("=")[1]
    assert f"world 2 backend gloo steps {steps}" in r.stdout
    b0, b1 = _batches(tmp_path, 0), _batches(tmp_path, 1)
    assert len(b0) == len(b1) == int(steps)
    assert any(b["ids"] is None for b in b0 + b1), "the run must reach a padding step"
    w0, w1 = torch.load(tmp_path / "rank0_weights.pt"), torch.load(tmp_path / "rank1_weights.pt")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks disagree on {k}"


def _epoch0_ids(*outs_ranks) -> list:
    return [i for out, rank in outs_ranks for b in _batches(out, rank) if b["epoch"] == 0 and b["ids"]
            for i in b["ids"]]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["shards"])  # the folder sampler's resume arithmetic: the property test above
def test_mid_epoch_resume_with_another_world_size_or_worker_count_continues_exactly(synth_dir, tmp_path, source):
    """Cut a 2-rank run (2 loader workers) mid-epoch, then resume it with 1 rank and 0 workers: the epoch's batches
    before and after the cut hold every training image exactly once. (Passes with source "folder" and with a
    2-rank, 0-worker resume too; left out for time: the property test covers every layout change on the plans,
    test_shard_stream_follows_its_batch_plan ties the plans to what the workers stream.)"""
    import shutil

    from captioner.data.manifest import open_shard_source

    data = synth_dir
    if source == "shards":
        from captioner.data.ingest import IngestOptions, ingest

        data = tmp_path / "shards"
        ingest(str(synth_dir), str(data), IngestOptions(shard_mb=0.03, progress=False, val_fraction=0.15,
                                                        test_fraction=0.15))
        want = sorted(it.image_id for it in open_shard_source(str(data))[1].items_in("train"))
    cut = tmp_path / "cut"
    common = ["--train.batch_size=4", "--train.epochs=1", "--train.ckpt_every=0"]
    r = _torchrun(tmp_path, data, cut, "--data.num_workers=2", *common, "--train.max_steps=3")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ck = torch.load(cut / "ckpt_latest.pt", weights_only=False)
    assert ck["step"] == 3 and ck["micro_in_epoch"] > 0, "the cut must fall inside the epoch"
    before = _epoch0_ids((cut, 0), (cut, 1))
    if source == "folder":
        from captioner.data.sources import assign_splits, read_records

        recs, _ = read_records(data)
        assign_splits(recs, 0.15, 0.15)
        want = sorted(x.image_id for x in recs if x.split == "train")
    for name, nproc, workers in [("W 2->1, workers 2->0", 1, "--data.num_workers=0")]:
        out = tmp_path / "resumed"
        shutil.copytree(cut, out)
        for f in out.glob("rank*_batches.jsonl"):
            f.unlink()
        r = _torchrun(tmp_path, data, out, workers, *common, "--train.max_steps=0", nproc=nproc, flags="--resume")
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert "with another layout (world 2 -> 1, num_workers 2 -> 0)" in r.stderr
        after = _epoch0_ids(*[(out, k) for k in range(nproc)])
        seen = before + after
        dups = len(seen) - len(set(seen))
        drops = len(set(want) - set(seen))
        assert (dups, drops) == (0, 0), f"{source} {name}: {dups} duplicated, {drops} dropped of {len(want)}"
        assert sorted(seen) == want


def test_training_streams_shards(synth_dir, store_uri, tmp_path):
    from captioner.training.train import train

    ingest(str(synth_dir), store_uri, ingest_opts())
    res = train(tiny_cfg(store_uri, tmp_path / "run", "--train.epochs=2", "--train.val_max_images=8"),
                progress=False)
    m = json.loads(open_store(store_uri).get_bytes(MANIFEST))
    n_train = m["splits"]["train"]["items"]
    assert res.step == 2 * -(-n_train // 8)
    assert len(res.val_history) == 2
    assert (tmp_path / "run" / "val_cache").is_dir()
