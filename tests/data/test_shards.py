"""The training stream over ingested shards (`captioner.data.shards`): every item read once per
epoch across ranks and DataLoader workers, whole shards per reader, the batch plan the stream
follows, and the loaders' padding and elastic-resume arithmetic."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.data.ingest import MANIFEST, ingest
from captioner.io.storage import open_store
from tests.helpers import ROOT, ingest_opts


@pytest.mark.slow
def test_ddp_ranks_see_every_training_item_exactly_once(synth_dir, store_uri, tmp_path):
    ingest(str(synth_dir), store_uri, ingest_opts(shard_mb=0.03))
    m = json.loads(open_store(store_uri).get_bytes(MANIFEST))
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "seen.json"
    worker = ROOT / "tests" / "data" / "ddp_shards_worker.py"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(worker), store_uri, str(out)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    seen = json.loads(out.read_text())
    train_ids = sorted(it["image_id"] for it in m["items"] if it["split"] == "train")
    for epoch, per_rank in seen["epochs"].items():
        allseen = [i for ids in per_rank for i in ids]
        assert sorted(allseen) == train_ids, f"epoch {epoch}: duplicated or missing items"
        assert all(per_rank), "both ranks got data"
    assert seen["batches"][0] == seen["batches"][1], "ranks must run the same number of steps"
    assert seen["epochs"]["0"] != seen["epochs"]["1"], "order is reshuffled per epoch"


def test_auto_shard_size_gives_every_reader_whole_shards_read_once(synth_dir, tmp_path, caplog):
    """`--shard-mb auto --target-workers 4`: at least two training shards per reader; an epoch over 2 ranks x 2
    workers then reads every shard byte once (the old item split read the one 64 MB shard 4 times). With one shard
    the trainer's loader warns and names the shard size to re-ingest with."""
    from captioner.bench.train_throughput import bytes_read_ratio
    from captioner.data.manifest import open_shard_source
    from captioner.data.shards import ShardStream

    ingest(str(synth_dir), str(tmp_path / "auto"), ingest_opts(shard_mb="auto", target_workers=4))
    _, m = open_shard_source(str(tmp_path / "auto"))
    assert m.splits["train"].shards >= 8 and m.options["target_workers"] == 4
    ratio, shards = bytes_read_ratio(tmp_path / "auto", world=2, workers=2, seekable=False)
    assert ratio <= 1.0, f"{ratio:.2f}x the data read for {shards} shards"
    ingest(str(synth_dir), str(tmp_path / "one"), ingest_opts(shard_mb=64.0))
    ratio_one, _ = bytes_read_ratio(tmp_path / "one", world=2, workers=2, seekable=False)
    assert 1.0 < ratio_one < 4.0  # readers stop after their last item instead of reading the whole shard
    store, m1 = open_shard_source(str(tmp_path / "one"))
    ds = ShardStream(store, m1, "train", None, None, 16, 8, 0, 2, 0, 10, 2)
    assert not ds.by_shard() and "--shard-mb auto --target-workers 4" in ds.repack_hint(10**6)
    r = subprocess.run([sys.executable, "-m", "captioner", "ingest", str(synth_dir), str(tmp_path / "x"),
                        "--shard-mb", "auto"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--target-workers" in r.stderr


def test_shard_stream_follows_its_batch_plan_and_tags_failed_batches(synth_dir, store_uri):
    """What the DataLoader workers stream is exactly `batch_plan` (the trainer's resume arithmetic relies on it), and
    a batch whose images are all missing comes back tagged as None instead of vanishing."""
    import dataclasses

    import torch

    from captioner.core.preprocess import PreprocessConfig
    from captioner.data.manifest import ItemEntry, open_shard_source
    from captioner.data.shards import ShardStream

    ingest(str(synth_dir), store_uri, ingest_opts(shard_mb=0.03))
    from captioner.core.tokenizer import CaptionTokenizer

    store, m = open_shard_source(store_uri)
    pre = PreprocessConfig(input_size=(3, 16, 16))
    tok = CaptionTokenizer.train([c for it in m.items for c in it.captions])
    for world, workers in ((2, 2), (1, 0)):
        for rank in range(world):
            ds = ShardStream(store, m, "train", tok, pre, 16, 3, rank, world, 7, 5, workers, tagged=True)
            ds.set_epoch(1)
            got = {(w, j): list(b[3]) for w, j, b in torch.utils.data.DataLoader(ds, batch_size=None,
                                                                                 num_workers=workers)}
            ids = {it.key: it.image_id for it in m.items}
            want = {(w, j): [ids[k] for k in b] for w in range(max(1, workers))
                    for j, b in enumerate(ds.batch_plan(rank, w))}
            assert got == want
    shard = m.shards_in("train")[0].name
    ghosts = [ItemEntry(f"ghost{i}.jpg", f"ghost{i}", "jpg", "train", shard, ("a cap",)) for i in range(3)]
    m2 = dataclasses.replace(m, items=ghosts)
    ds = ShardStream(store, m2, "train", tok, pre, 16, 3, tagged=True)
    assert list(ds) == [(0, 0, None)]


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
