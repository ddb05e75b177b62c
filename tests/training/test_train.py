import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.modeling.checkpoint import load_checkpoint
from tests.conftest import ROOT, TINY, tiny_cfg


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
    from captioner.training.metrics import caption_metrics

    refs = {"a": ["a red circle on the left", "a small red circle on the left side"],
            "b": ["a blue square at the top", "a big blue square near the top"]}
    good = caption_metrics(refs, {"a": "a red circle on the left", "b": "a blue square at the top"}, meteor=False)
    bad = caption_metrics(refs, {"a": "a blue square at the top", "b": "a red circle on the left"}, meteor=False)
    assert good["CIDEr"] > bad["CIDEr"] + 1 and good["BLEU-4"] > 0.5 > bad["BLEU-4"]


# ------------------------------------------------------------------ uneven inputs, elastic resume
def _manifest(rng, n_items: int, n_shards: int):
    """An in-memory shard manifest: n_items train items over n_shards shards of random sizes."""
    from captioner.data.manifest import ItemEntry, Manifest, ShardEntry, SplitCount

    cuts = sorted(rng.sample(range(1, n_items), n_shards - 1)) if n_shards > 1 else []
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n_items])]
    shards, items = [], []
    for s, size in enumerate(sizes):
        name = f"train-{s:05d}.tar"
        shards.append(ShardEntry(name, "train", "0" * 64, 1000 * size, size))
        items += [ItemEntry(f"{name}-{k}.jpg", f"s{s}_{k}", "jpg", "train", name, ("a cap",)) for k in range(size)]
    return Manifest("mem", {}, {"train": SplitCount(n_items, n_shards)}, shards, items)


def _stream(m, W, nw, bs, seed=5, buffer=7, rank=0):
    from captioner.data.shards import ShardStream

    return ShardStream(None, m, "train", None, None, 16, bs, rank, W, seed, buffer, nw)


def test_loaders_property_every_pair_once_equal_steps_padding_and_elastic_resume():
    """Random (items 1..400, shards 1..24, W 1..8, workers 0..4, batch 1..64, epoch 0..2), 400 cases: the shard
    loader's readers see every item exactly once, each rank runs max-over-ranks micro-batches (the short ones pad),
    each shard is read once when there are enough shards; a cut anywhere followed by a resume with another random
    (W, workers, batch) consumes every item exactly once. The folder sampler: same count on every rank, every item
    at least once and at most W-1 wrap repeats, and a resume at any position with another W continues exactly."""
    import random

    from captioner.data.datasets import ResumableBatchSampler

    rng = random.Random(20)
    padded = by_shard = 0
    for case in range(400):
        n, W, nw, bs = rng.randint(1, 400), rng.randint(1, 8), rng.randint(0, 4), rng.randint(1, 64)
        m = _manifest(rng, n, rng.randint(1, min(24, n)))
        ds = _stream(m, W, nw, bs)
        ds.set_epoch(rng.randint(0, 2))
        readers = [(r, w) for r in range(W) for w in range(max(1, nw))]
        plans = {rw: ds.batch_plan(*rw) for rw in readers}
        keys = [k for p in plans.values() for b in p for k in b]
        assert sorted(keys) == sorted(it.key for it in m.items), f"case {case}: not every item exactly once"
        assert all(0 < len(b) <= bs for p in plans.values() for b in p)
        steps = ds.batches_per_rank()
        per_rank = [sum(len(plans[(r, w)]) for w in range(max(1, nw))) for r in range(W)]
        assert steps == max(per_rank) and all(ds.batches_of(r) == per_rank[r] for r in range(W))
        padded += steps > min(per_rank)
        reads, shards = ds.read_amplification()
        if ds.by_shard():
            by_shard += 1
            assert reads == shards, f"case {case}: a shard is read twice although every reader has its own"
        # cut every reader anywhere, resume with another layout: the rest of the epoch is exactly the items left
        taken = [[rng.randint(0, len(plans[(r, w)])) for w in range(max(1, nw))] for r in range(W)]
        done = ds.consumed(taken)
        assert len(done) == sum(len(b) for (r, w) in readers for b in plans[(r, w)][:taken[r][w]])
        W2, nw2, bs2 = rng.randint(1, 8), rng.randint(0, 4), rng.randint(1, 64)
        ds2 = _stream(m, W2, nw2, bs2, seed=6)
        ds2.set_epoch(ds.epoch, done)
        rest = [k for r in range(W2) for w in range(max(1, nw2)) for b in ds2.batch_plan(r, w) for k in b]
        assert sorted([*done, *rest]) == sorted(it.key for it in m.items), f"case {case}: resume dup/drop"
        # the folder path's sampler
        start = rng.randint(0, n)
        samplers = [ResumableBatchSampler(n, bs, r, W, seed=3) for r in range(W)]
        for s in samplers:
            s.set_epoch(1, 0, start)
        batches = [list(s) for s in samplers]
        assert len({len(b) for b in batches}) == 1 and all(len(b) == len(s) for b, s in zip(batches, samplers))
        seen = [i for b in batches for bb in b for i in bb]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(3 + 1)).tolist()
        assert set(seen) == set(perm[start:]) and len(seen) - (n - start) <= W - 1
        if n - start and len(batches[0]) > 1:  # consumed after k batches on every rank = a prefix of the permutation
            k = rng.randint(1, len(batches[0]) - 1)
            first = [i for b in batches for bb in b[:k] for i in bb]
            assert sorted(first) == sorted(perm[start:start + k * bs * W])
    assert padded > 100 and by_shard > 50, (padded, by_shard)  # the ranges reach padding and both partitions


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
