import io
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from captioner.data.ingest import MANIFEST, ingest, verify
from captioner.io.storage import TMP_PREFIX, open_store
from tests.helpers import ingest_opts, jpeg_bytes, left_red_right_blue, probe_opts, with_exif


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


def test_ingest_validates_shards_and_verifies(synth_copy, store_uri):
    bad = _damage(synth_copy)
    r = ingest(str(synth_copy), store_uri, ingest_opts())
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
    r = ingest(str(z), str(tmp_path / "out"), ingest_opts(max_side=24))
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


def _zip_dataset(path: Path, extra: list) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("flickr30k_images/results.csv", "image_name| comment_number| comment\nok.jpg| 0| a red square\n")
        z.writestr("flickr30k_images/flickr30k_images/ok.jpg", jpeg_bytes())
        for name, data in extra:
            z.writestr(name, data)


def test_zip_total_uncompressed_size_is_capped(tmp_path, monkeypatch):
    import captioner.data.ingest as ingest_mod

    monkeypatch.setattr(ingest_mod, "MAX_UNZIP_BYTES", 16 * 1024 * 1024, raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    z = tmp_path / "bomb.zip"
    _zip_dataset(z, [("flickr30k_images/pad.bin", b"\0" * (64 * 1024 * 1024))])  # 64 MiB in ~64 KB
    assert z.stat().st_size < 1024 * 1024
    with pytest.raises(ValueError, match=r"bomb\.zip.*16\.8 MB"):
        ingest(str(z), str(tmp_path / "out"), probe_opts())
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert sum(p.stat().st_size for p in (tmp_path / "tmp").rglob("*") if p.is_file()) == 0


def test_zip_member_count_is_capped_and_names_cannot_escape(tmp_path, monkeypatch):
    import captioner.data.ingest as ingest_mod

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    z = tmp_path / "escape.zip"
    _zip_dataset(z, [("../../../evil.txt", b"x"), (f"{tmp_path}/abs-evil.txt", b"x")])
    r = ingest(str(z), str(tmp_path / "out"), probe_opts())
    assert r["items"] == 1
    assert not list(tmp_path.rglob("evil.txt")) and not list(tmp_path.rglob("abs-evil.txt"))
    monkeypatch.setattr(ingest_mod, "MAX_UNZIP_MEMBERS", 3, raising=False)
    z2 = tmp_path / "many.zip"
    _zip_dataset(z2, [(f"flickr30k_images/pad{i}.txt", b"x") for i in range(10)])
    with pytest.raises(ValueError, match=r"many\.zip.*12 members.*3"):
        ingest(str(z2), str(tmp_path / "out2"), probe_opts())


@pytest.mark.parametrize("strip", [True, False])
def test_ingest_strips_exif_and_gps_by_default(tmp_path, strip):
    from captioner.io.storage import iter_tar_members

    src = tmp_path / "ds"
    (src / "flickr30k_images").mkdir(parents=True)
    (src / "flickr30k_images" / "geo.jpg").write_bytes(with_exif(left_red_right_blue(), 6, gps=True))
    (src / "results.csv").write_text("geo.jpg| 0| red above blue\n")
    opts = probe_opts() if strip else probe_opts(strip_metadata=False)
    ingest(str(src), str(tmp_path / "out"), opts)
    store = open_store(str(tmp_path / "out"))
    with store.open("train-00000.tar") as f:
        data = [d for m, d in iter_tar_members(f) if m.name.endswith(".jpg")][0]
    img = Image.open(io.BytesIO(data))
    exif = img.getexif()
    if strip:
        assert 0x8825 not in exif and 0x0112 not in exif and b"Exif" not in data[:200]
        assert img.size == (32, 64)  # orientation baked into the pixels before the tag was dropped
    else:
        assert 0x8825 in exif and exif[0x0112] == 6 and img.size == (64, 32)
