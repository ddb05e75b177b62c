import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from captioner.data.ingest import MANIFEST, IngestOptions, ingest, verify
from captioner.io.storage import TMP_PREFIX, open_store
from tests.conftest import ROOT


def _damage(src: Path) -> dict:
    """Corrupt, missing, empty-caption and decompression-bomb items in a generated set."""
    imgs = sorted((src / "flickr30k_images").glob("*.jpg"))
    imgs[0].write_bytes(imgs[0].read_bytes()[:300])  # truncated JPEG
    imgs[1].write_bytes(b"GIF89a not really")  # not an image
    imgs[2].unlink()  # missing file
    bomb = src / "flickr30k_images" / "bomb.png"
    Image.new("1", (12000, 10000)).save(bomb)  # 120 MP, a few KB on disk
    csv = src / "results.csv"
    csv.write_text(csv.read_text() + f"bomb.png| 0| A black square .\n{imgs[3].name}| 5|  \n")
    return {"unreadable": {imgs[0].name, imgs[1].name, "bomb.png"}, "missing": imgs[2].name}


def _opts(**kw):
    return IngestOptions(**{"shard_mb": 0.05, "workers": 4, "progress": False, "val_fraction": 0.15,
                            "test_fraction": 0.15, **kw})


def test_ingest_validates_shards_and_verifies(synth_copy, store_uri):
    bad = _damage(synth_copy)
    r = ingest(str(synth_copy), store_uri, _opts())
    store = open_store(store_uri)
    m = json.loads(store.get_bytes(MANIFEST))
    ids = {it["image_id"] for it in m["items"]}
    assert len(ids) == len(m["items"]) == r["items"] == 80 - 3
    assert not ids & bad["unreadable"] and bad["missing"] not in ids
    assert set(m["skipped"]["unreadable image"]) == bad["unreadable"]
    assert m["skipped"]["missing image file"] == [bad["missing"]]
    assert len(m["skipped"]["empty caption"]) == 1
    # shards are grouped by split and every item's split matches its shard's
    shards = {s["name"]: s for s in m["shards"]}
    assert r["shards"] == len(shards) > 3
    assert all(shards[it["shard"]]["split"] == it["split"] for it in m["items"])
    assert sum(s["items"] for s in shards.values()) == len(m["items"])
    assert {k for k in store.list()} == set(shards) | {MANIFEST}
    v = verify(store_uri, progress=False)
    assert v["ok"] and v["shards"] == len(shards)
    # a damaged shard is caught
    first = m["shards"][0]["name"]
    store.put_bytes(first, b"tampered")
    v = verify(store_uri, progress=False)
    assert not v["ok"] and v["problems"] == [f"{first}: size 8 != manifest {m['shards'][0]['size']}"]


def test_zip_source_and_resize(synth_dir, tmp_path):
    z = tmp_path / "flickr30k.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.write(synth_dir / "results.csv", "flickr30k_images/results.csv")
        for p in sorted((synth_dir / "flickr30k_images").glob("*.jpg"))[:10]:
            f.write(p, f"flickr30k_images/flickr30k_images/{p.name}")
    r = ingest(str(z), str(tmp_path / "out"), _opts(max_side=24))
    assert r["items"] == 10
    import io

    from captioner.io.storage import iter_tar_members

    store = open_store(str(tmp_path / "out"))
    name = json.loads(store.get_bytes(MANIFEST))["shards"][0]["name"]
    with store.open(name) as f:
        sizes = [Image.open(io.BytesIO(d)).size for m, d in iter_tar_members(f) if m.name.endswith(".jpg")]
    assert sizes and all(max(s) == 24 for s in sizes)


def _ingest_cmd(src, dest):
    return [sys.executable, "-m", "captioner", "ingest", str(src), dest, "--shard-mb", "0.02", "--workers", "1",
            "--no-progress", "--val-fraction", "0.15", "--test-fraction", "0.15"]


@pytest.mark.slow
def test_kill_midway_then_rerun_equals_clean_run(synth_dir, store_uri):
    env = {**os.environ}
    clean, resumed = store_uri + "-clean", store_uri + "-resumed"
    subprocess.run(_ingest_cmd(synth_dir, clean), check=True, env=env, capture_output=True)
    p = subprocess.Popen(_ingest_cmd(synth_dir, resumed), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    n = 0
    for line in p.stdout:
        if "uploaded shard" in line:
            n += 1
            if n == 3:
                p.send_signal(signal.SIGKILL)
                break
    p.wait()
    assert p.returncode == -signal.SIGKILL
    a, b = open_store(clean), open_store(resumed)
    assert not b.exists(MANIFEST), "the manifest is written last"
    partial = b.list()
    assert 3 <= len(partial) < len(a.list()) - 1
    r = subprocess.run(_ingest_cmd(synth_dir, resumed), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("already stored with sha256") >= 3
    assert a.get_bytes(MANIFEST) == b.get_bytes(MANIFEST)
    assert a.list() == b.list()
    for key in a.list():
        assert a.sha256(key) == b.sha256(key), key
    if not store_uri.startswith("s3://"):
        assert not list(Path(resumed).rglob(f"{TMP_PREFIX}*")), "no partial files left"
    assert verify(resumed, progress=False)["ok"]


@pytest.mark.parametrize("case", ["bad-key", "unreachable"])
def test_wrong_credentials_or_endpoint_fail_fast_and_clearly(synth_dir, s3_server, case):
    env = {**os.environ, **s3_server}
    if case == "bad-key":
        env["AWS_SECRET_ACCESS_KEY"] = "wrong-secret"
        env["AWS_ACCESS_KEY_ID"] = "AKIAWRONGWRONGWRONG"
        needle = "InvalidAccessKeyId"
    else:
        env["CAPTIONER_S3_ENDPOINT"] = "127.0.0.1:9"
        needle = "cannot reach the endpoint"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "captioner", "ingest", str(synth_dir), "s3://bucket/x", "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert needle in r.stderr and env["CAPTIONER_S3_ENDPOINT"] in r.stderr
    assert "Traceback" not in r.stderr and "wrong-secret" not in r.stderr
    assert time.time() - t0 < 60


@pytest.mark.slow
def test_ddp_ranks_see_every_training_item_exactly_once(synth_dir, store_uri, tmp_path):
    ingest(str(synth_dir), store_uri, _opts(shard_mb=0.03))
    m = json.loads(open_store(store_uri).get_bytes(MANIFEST))
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "seen.json"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "data" / "ddp_shards_worker.py"),
                        store_uri, str(out)], capture_output=True, text=True, timeout=300,
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


def test_training_streams_shards(synth_dir, store_uri, tmp_path):
    from captioner.training.train import train
    from tests.conftest import tiny_cfg

    ingest(str(synth_dir), store_uri, _opts())
    res = train(tiny_cfg(store_uri, tmp_path / "run", "--train.epochs=2", "--train.val_max_images=8"),
                progress=False)
    m = json.loads(open_store(store_uri).get_bytes(MANIFEST))
    n_train = m["splits"]["train"]["items"]
    assert res.step == 2 * -(-n_train // 8)
    assert len(res.val_history) == 2
    assert (tmp_path / "run" / "val_cache").is_dir()


def test_large_objects_go_multipart_and_keep_their_checksum(s3_server, monkeypatch, tmp_path):
    import hashlib

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    from captioner.io.storage import PART_SIZE

    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(PART_SIZE + 3 * 1024 * 1024))
    store = open_store("s3://multipart/x", create=True)
    store.put_file("big.tar", big)
    st = store.client.stat_object("multipart", "x/big.tar")
    assert st.etag.endswith("-2"), f"expected a 2-part upload, etag {st.etag}"
    want = hashlib.sha256(big.read_bytes()).hexdigest()
    assert store.stored_sha256("big.tar") == want == store.sha256("big.tar")


def test_auto_shard_size_gives_every_reader_whole_shards_read_once(synth_dir, tmp_path, caplog):
    """`--shard-mb auto --target-workers 4`: at least two training shards per reader; an epoch over 2 ranks x 2
    workers then reads every shard byte once (the old item split read the one 64 MB shard 4 times). With one shard
    the trainer's loader warns and names the shard size to re-ingest with."""
    from captioner.bench.train_throughput import bytes_read_ratio
    from captioner.data.manifest import open_shard_source
    from captioner.data.shards import ShardStream

    ingest(str(synth_dir), str(tmp_path / "auto"), _opts(shard_mb="auto", target_workers=4))
    _, m = open_shard_source(str(tmp_path / "auto"))
    assert m.splits["train"].shards >= 8 and m.options["target_workers"] == 4
    ratio, shards = bytes_read_ratio(tmp_path / "auto", world=2, workers=2, seekable=False)
    assert ratio <= 1.0, f"{ratio:.2f}x the data read for {shards} shards"
    ingest(str(synth_dir), str(tmp_path / "one"), _opts(shard_mb=64.0))
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

    ingest(str(synth_dir), store_uri, _opts(shard_mb=0.03))
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
