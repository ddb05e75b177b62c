"""Hostile files, archives, object keys, URIs and images (issue 10 items 2, 3, 4, 5, 9, 12;
issue 14 items 5, 11, 14). Each test performs the attack with probes generated here and
checks the bounded outcome: refused with an error naming the offender, nothing written
outside the target folder, memory bounded (generous margins, never timings)."""
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from captioner.core.preprocess import ImageError, PreprocessConfig, preprocess_bytes
from captioner.data.ingest import IngestOptions, ingest
from captioner.io.storage import open_store

ENV = {**os.environ}


def _jpeg(color=(200, 30, 30), size=(32, 32), **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95, **save)
    return buf.getvalue()


def _opts(**kw):
    return IngestOptions(**{"shard_mb": 1, "workers": 2, "progress": False, "val_fraction": 0.0,
                            "test_fraction": 0.0, **kw})


def _files_under(p: Path) -> set:
    return {x.relative_to(p).as_posix() for x in p.rglob("*")} if p.exists() else set()


# ------------------------------------------------------------------ 10.2 tar member paths + manifest schema
def _shard_store(root: Path, members: list, items: list) -> None:
    """A dataset folder as `captioner ingest` writes it, but with attacker-chosen member names and items."""
    root.mkdir(parents=True)
    with tarfile.open(root / "val-00000.tar", "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    tar = (root / "val-00000.tar").read_bytes()
    import hashlib

    m = {"format": "captioner-shards", "version": 1, "source": "probe", "options": {},
         "splits": {"train": {"items": 0, "shards": 0}, "val": {"items": len(items), "shards": 1},
                    "test": {"items": 0, "shards": 0}},
         "shards": [{"name": "val-00000.tar", "split": "val", "sha256": hashlib.sha256(tar).hexdigest(),
                     "size": len(tar), "items": len(items)}],
         "items": [{"image_id": f"{it['key']}.jpg", "split": "val", "shard": "val-00000.tar",
                    "captions": ["a probe"], **it} for it in items],
         "skipped": {}}
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("attack", ["dotdot", "absolute"])
def test_tar_members_and_manifest_keys_cannot_write_outside_the_cache(tmp_path, attack):
    from captioner.data.manifest import materialize, open_shard_source

    outside = tmp_path / "outside"  # the attacker's target exists (think site-packages)
    outside.mkdir()
    assert "." not in str(outside), "the probe needs a dot-free absolute path"
    cache = tmp_path / "a" / "b" / "cache"
    if attack == "dotdot":  # member ../../evil.pth -> key "" + ext "./../evil.pth" in the old parser
        member, item = "../../outside/evil.pth", {"key": "", "ext": "./../outside/evil.pth"}
        cache = tmp_path / "a" / "cache"
    else:
        member, item = f"{outside}/evil.pth", {"key": f"{outside}/evil", "ext": "pth"}
    _shard_store(tmp_path / "ds", [(member, b"import os  # code at the next Python start\n")], [item])
    err = ""
    try:
        store, manifest = open_shard_source(str(tmp_path / "ds"))
        materialize(store, manifest, "val", cache)
    except ValueError as e:
        err = str(e)
    assert list(outside.iterdir()) == [] and not list(tmp_path.rglob("evil.pth"))
    assert re.search(r"manifest\.json.*items\[0\]\.(key|ext)", err), err


def test_valid_manifest_with_hostile_members_extracts_only_its_items(tmp_path):
    from captioner.data.manifest import materialize, open_shard_source

    outside = tmp_path / "outside"
    good = _jpeg()
    members = [(f"{outside}/k1.jpg", b"x"), ("../k1.jpg", b"x"), ("k1.jpg/../../k1.jpg", b"x"),
               ("k1.pth", b"x"), ("k1.jpg", good), ("k1.json", b"{}")]
    _shard_store(tmp_path / "ds", members, [{"key": "k1", "ext": "jpg"}])
    store, manifest = open_shard_source(str(tmp_path / "ds"))
    recs = materialize(store, manifest, "val", tmp_path / "cache")
    assert [Path(r.path).name for r in recs] == ["k1.jpg"] and Path(recs[0].path).read_bytes() == good
    assert _files_under(tmp_path / "cache") == {"k1.jpg", "records.json"}
    assert not outside.exists() and not (tmp_path / "k1.jpg").exists()


@pytest.mark.parametrize("field,value,needle", [
    ("items[0].key", "a/b", "items[0].key"),
    ("items[0].ext", "pth", "items[0].ext"),
    ("items[0].captions", "not a list", "items[0].captions"),
    ("shards[0].size", "12", "shards[0].size"),
    ("shards[0].name", "../x.tar", "shards[0].name"),
    ("items", None, "items"),
    ("version", 99, "version"),
])
def test_manifest_schema_is_validated_when_read(tmp_path, field, value, needle):
    from captioner.data.manifest import open_shard_source

    _shard_store(tmp_path / "ds", [("k1.jpg", _jpeg())], [{"key": "k1", "ext": "jpg"}])
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    path = field.replace("]", "").replace("[", ".").split(".")
    obj = m
    for p in path[:-1]:
        obj = obj[int(p)] if p.isdigit() else obj[p]
    if value is None:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError) as e:
        open_shard_source(str(tmp_path / "ds"))
    msg = str(e.value)
    assert needle in msg and "manifest.json" in msg and "\n" not in msg, msg


# ------------------------------------------------------------------ 10.3 object keys in storage.fetch
@pytest.mark.parametrize("attack", ["absolute", "dotdot"])
def test_fetch_skips_keys_that_would_land_outside(s3_server, monkeypatch, tmp_path, caplog, attack):
    from captioner.io.storage import fetch

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    outside = tmp_path / "outside"
    bucket = f"fetch-{attack}"
    store = open_store(f"s3://{bucket}/run", create=True)
    store.put_bytes("ckpt_best.pt", b"good")
    store.put_bytes("sub/metrics.jsonl", b"{}")
    hostile = {"absolute": [f"run/{outside}/evil.pth"], "dotdot": ["run/../escape.pth", "run/sub/../../escape2.pth"]}[attack]
    import boto3  # the minio client refuses to *write* '..' names; S3 itself stores them

    s3 = boto3.client("s3", endpoint_url=f"http://{s3_server['CAPTIONER_S3_ENDPOINT']}", region_name="us-east-1",
                      aws_access_key_id=s3_server["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=s3_server["AWS_SECRET_ACCESS_KEY"])
    for key in hostile:  # `prefix//abs/path`, `..` keys: legal S3 object names
        s3.put_object(Bucket=bucket, Key=key, Body=b"pwned")
    listed = store.list()
    assert any(k.startswith("/") or ".." in k for k in listed), listed  # the server keeps the hostile names
    local = tmp_path / "dl" / "run"
    with caplog.at_level("WARNING"):
        got = fetch(f"s3://{bucket}/run", local)
    assert got == local
    assert (local / "ckpt_best.pt").read_bytes() == b"good" and (local / "sub" / "metrics.jsonl").exists()
    assert not outside.exists() and not (tmp_path / "dl" / "escape.pth").exists()
    assert _files_under(tmp_path / "dl") == {"run", "run/ckpt_best.pt", "run/sub", "run/sub/metrics.jsonl"}
    assert "outside the download folder" in caplog.text and hostile[0][4:] in caplog.text


# ------------------------------------------------------------------ 10.4 dataset paths and zip limits
def test_csv_image_names_are_confined_to_the_image_root(tmp_path):
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    (secret_dir / "id_rsa.jpg").write_bytes(_jpeg((1, 2, 3)))
    src = tmp_path / "ds"
    (src / "flickr30k_images").mkdir(parents=True)
    (src / "flickr30k_images" / "ok.jpg").write_bytes(_jpeg())
    (src / "results.csv").write_text(
        "image_name| comment_number| comment\n"
        "ok.jpg| 0| a red square\n"
        f"{secret_dir}/id_rsa.jpg| 0| an absolute name\n"
        "../../secrets/id_rsa.jpg| 0| a relative escape\n"
        "sub/../../../secrets/id_rsa.jpg| 0| a hidden escape\n")
    r = ingest(str(src), str(tmp_path / "out"), _opts())
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [it["image_id"] for it in m["items"]] == ["ok.jpg"] and r["items"] == 1
    refused = m["skipped"]["image path outside the image folder"]
    assert sorted(refused) == sorted([f"{secret_dir}/id_rsa.jpg", "../../secrets/id_rsa.jpg",
                                      "sub/../../../secrets/id_rsa.jpg"])
    assert r["skipped_items"]["image path outside the image folder"] == 3


@pytest.mark.parametrize("fmt", ["coco", "karpathy"])
def test_json_image_names_are_confined_to_the_image_root(tmp_path, fmt):
    from captioner.data.sources import read_records

    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "x.jpg").write_bytes(_jpeg())
    root = tmp_path / "ds" / "images"
    root.mkdir(parents=True)
    (root / "ok.jpg").write_bytes(_jpeg())
    names = ["ok.jpg", str(tmp_path / "secrets" / "x.jpg"), "../../secrets/x.jpg"]
    if fmt == "coco":
        data = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                "annotations": [{"image_id": i, "caption": "a thing"} for i in range(len(names))]}
    else:
        data = {"images": [{"filename": n, "split": "train", "sentences": [{"raw": "a thing"}]} for n in names]
                + [{"filename": "x.jpg", "filepath": "../../secrets", "split": "train",
                    "sentences": [{"raw": "a thing"}]}]}
    (tmp_path / "ds" / "caps.json").write_text(json.dumps(data))
    recs, summary = read_records(tmp_path / "ds" / "caps.json", image_root=str(root))
    assert [r.image_id for r in recs] == ["ok.jpg"]
    assert len(summary.skipped["image path outside the image folder"]) == len(data["images"]) - 1


def _zip_dataset(path: Path, extra: list) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("flickr30k_images/results.csv", "image_name| comment_number| comment\nok.jpg| 0| a red square\n")
        z.writestr("flickr30k_images/flickr30k_images/ok.jpg", _jpeg())
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
        ingest(str(z), str(tmp_path / "out"), _opts())
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert sum(p.stat().st_size for p in (tmp_path / "tmp").rglob("*") if p.is_file()) == 0


def test_zip_member_count_is_capped_and_names_cannot_escape(tmp_path, monkeypatch):
    import captioner.data.ingest as ingest_mod

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    z = tmp_path / "escape.zip"
    _zip_dataset(z, [("../../../evil.txt", b"x"), (f"{tmp_path}/abs-evil.txt", b"x")])
    r = ingest(str(z), str(tmp_path / "out"), _opts())
    assert r["items"] == 1
    assert not list(tmp_path.rglob("evil.txt")) and not list(tmp_path.rglob("abs-evil.txt"))
    monkeypatch.setattr(ingest_mod, "MAX_UNZIP_MEMBERS", 3, raising=False)
    z2 = tmp_path / "many.zip"
    _zip_dataset(z2, [(f"flickr30k_images/pad{i}.txt", b"x") for i in range(10)])
    with pytest.raises(ValueError, match=r"many\.zip.*12 members.*3"):
        ingest(str(z2), str(tmp_path / "out2"), _opts())


# ------------------------------------------------------------------ 10.5 canvas / aspect-ratio bombs, decoders
def _png(width: int, height: int) -> bytes:
    """A grey PNG written by hand (zlib of the filtered rows), so a 49-megapixel probe costs ~100 KB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = (b"\0" + b"\x80" * width) * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _gif_canvas(w: int, h: int) -> bytes:
    """A 29-byte GIF whose logical screen is w x h with one 1x1 frame."""
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0) + b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
            + b"\x02\x02\x44\x01\x00;")


PROBE = r"""
import json, resource, sys
from captioner.core.preprocess import ImageError, PreprocessConfig, preprocess_bytes
data = open(sys.argv[1], "rb").read()
cfg = PreprocessConfig(input_size=(3, 32, 32), max_pixels=int(sys.argv[2]))
preprocess_bytes(b"GIF89a", cfg) if False else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    preprocess_bytes(data, cfg, name="probe")
    out = "accepted"
except ImageError as e:
    out = "refused: " + str(e)
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"out": out, "grew_mb": grew}))
"""


def _probe(tmp_path, data: bytes, max_pixels: int) -> dict:
    f = tmp_path / "probe.bin"
    f.write_bytes(data)
    warm = tmp_path / "warm.png"  # decode a small PNG first so imports/allocator warm-up are not counted
    Image.new("RGB", (64, 64)).save(warm)
    script = PROBE.replace('preprocess_bytes(b"GIF89a", cfg) if False else None',
                           f'preprocess_bytes(open({str(warm)!r}, "rb").read(), cfg)')
    r = subprocess.run([sys.executable, "-c", script, str(f), str(max_pixels)], env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_aspect_ratio_bomb_is_refused_before_decoding(tmp_path):
    data = _png(1, 49_000_000)  # 49 MP: under the 50 MP ingest cap, 1:49,000,000
    assert len(data) < 200_000
    r = _probe(tmp_path, data, 50_000_000)
    assert r["out"].startswith("refused: probe") and "aspect ratio" in r["out"], r
    assert r["grew_mb"] < 64, r  # the full decode took ~2 GiB


def test_canvas_bomb_gif_is_refused_under_the_serving_cap(tmp_path):
    from captioner.core.preprocess import DEFAULT_MAX_PIXELS, SERVING_MAX_PIXELS

    assert SERVING_MAX_PIXELS <= DEFAULT_MAX_PIXELS // 2
    data = _gif_canvas(7000, 7000)
    assert len(data) < 64  # 29 bytes
    r = _probe(tmp_path, data, SERVING_MAX_PIXELS)
    assert r["out"].startswith("refused: probe") and "49.0 megapixels" in r["out"], r
    assert r["grew_mb"] < 32, r
    with pytest.raises(ImageError, match="over the limit of 16.0 megapixels"):
        preprocess_bytes(data, PreprocessConfig(), max_pixels=SERVING_MAX_PIXELS)


@pytest.mark.parametrize("fmt", ["TGA", "PCX", "ICO", "SGI", "PPM"])
def test_decoders_are_restricted_to_accepted_formats(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, fmt)
    with pytest.raises(ImageError, match=r"not an accepted image format.*JPEG.*PNG"):
        preprocess_bytes(buf.getvalue(), PreprocessConfig(input_size=(3, 16, 16)), name="probe")


# ------------------------------------------------------------------ 10.9 EXIF orientation, 16-bit, metadata stripping
def _unnorm(x: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    return x * np.asarray(cfg.std, np.float32)[:, None, None] + np.asarray(cfg.mean, np.float32)[:, None, None]


def _left_red_right_blue(w=64, h=32) -> Image.Image:
    img = Image.new("RGB", (w, h), (20, 40, 230))
    ImageDraw.Draw(img).rectangle([0, 0, w // 2 - 1, h - 1], fill=(230, 20, 20))
    return img


def _with_exif(img: Image.Image, orientation: int = 6, gps: bool = False, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    if gps:
        exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)}
    buf = io.BytesIO()
    img.save(buf, fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt,size", [("JPEG", (64, 32)), ("PNG", (1200, 600))])  # PNG: reduced before resizing
def test_exif_orientation_is_applied(tmp_path, fmt, size):
    cfg = PreprocessConfig(input_size=(3, 32, 32))
    stored = _left_red_right_blue(*size)  # sensor layout; orientation 6 = show rotated 90 degrees clockwise
    shown = stored.transpose(Image.Transpose.ROTATE_270)
    buf = io.BytesIO()
    shown.save(buf, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    want = preprocess_bytes(buf.getvalue(), cfg)
    got = preprocess_bytes(_with_exif(stored, 6, fmt=fmt), cfg)
    assert np.abs(_unnorm(got, cfg) - _unnorm(want, cfg)).max() < 0.1
    px = _unnorm(got, cfg)
    assert px[0, 4, 16] > 0.8 and px[2, 28, 16] > 0.8  # red on top, blue at the bottom, as a viewer shows it


def test_16_bit_images_are_scaled_not_clipped():
    cfg = PreprocessConfig(input_size=(3, 16, 16))
    arr = np.full((16, 16), 32768, np.uint16)  # 16-bit grey PNG: half and one eighth of full scale
    arr[:, 8:] = 8192
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    px = _unnorm(preprocess_bytes(buf.getvalue(), cfg), cfg)
    assert abs(px[:, 8, 2].mean() - 0.5) < 0.02 and abs(px[:, 8, 13].mean() - 0.125) < 0.02, px[:, 8, :].round(2)


@pytest.mark.parametrize("strip", [True, False])
def test_ingest_strips_exif_and_gps_by_default(tmp_path, strip):
    from captioner.io.storage import iter_tar_members

    src = tmp_path / "ds"
    (src / "flickr30k_images").mkdir(parents=True)
    (src / "flickr30k_images" / "geo.jpg").write_bytes(_with_exif(_left_red_right_blue(), 6, gps=True))
    (src / "results.csv").write_text("geo.jpg| 0| red above blue\n")
    opts = _opts() if strip else _opts(strip_metadata=False)
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


# ------------------------------------------------------------------ 14.14 transparency onto white
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_png_is_composited_onto_white(mode):
    cfg = PreprocessConfig(input_size=(3, 32, 32))
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse([16, 16, 47, 47], fill=(230, 10, 10, 255))
    if mode == "LA":
        img = img.convert("LA")
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        img.info["transparency"] = img.getpixel((0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG", **({"transparency": img.info["transparency"]} if mode == "P" else {}))
    px = _unnorm(preprocess_bytes(buf.getvalue(), cfg), cfg)
    assert px[:, 1, 1].min() > 0.95 and px[:, 30, 30].min() > 0.95, px[:, 1, 1]  # background: white
    centre = px[:, 16, 16]
    assert (centre[0] > 0.8 and centre[1] < 0.2) if mode != "LA" else centre.max() < 0.5  # the circle stays


# ------------------------------------------------------------------ 14.5 mistyped S3 URIs
@pytest.mark.parametrize("dest", ["s3:/bucket", "s3:bucket/x", "S3://bucket/x", "gs://bucket/x", "http://host/x"])
def test_mistyped_s3_uri_is_refused_and_nothing_is_written(synth_dir, tmp_path, dest):
    work = tmp_path / "cwd"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "captioner", "ingest", str(synth_dir), dest, "--no-progress"],
                       cwd=work, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stdout
    assert dest in r.stderr and "s3://bucket/prefix" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(work.iterdir()) == []


# ------------------------------------------------------------------ 14.11 umask
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_written_files_respect_the_umask(synth_dir, tmp_path, umask):
    import torch

    from captioner.modeling.checkpoint import atomic_save

    old = os.umask(umask)
    try:
        src = tmp_path / "src"
        (src / "flickr30k_images").mkdir(parents=True)
        for p in sorted((synth_dir / "flickr30k_images").glob("*.jpg"))[:4]:
            (src / "flickr30k_images" / p.name).write_bytes(p.read_bytes())
        (src / "results.csv").write_text("".join(f"{p.name}| 0| a thing\n"
                                                 for p in sorted((src / "flickr30k_images").glob("*.jpg"))))
        ingest(str(src), str(tmp_path / "out"), _opts())
        atomic_save({"w": torch.zeros(2)}, tmp_path / "run" / "ckpt_latest.pt")  # how training writes checkpoints
    finally:
        os.umask(old)
    written = [p for p in [*(tmp_path / "out").rglob("*"), tmp_path / "run" / "ckpt_latest.pt"] if p.is_file()]
    assert len(written) >= 2
    for p in written:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, f"{p}: {oct(p.stat().st_mode & 0o777)}"


def test_exported_repository_respects_the_umask(trained_run, tmp_path):
    from captioner.export.exporter import export

    old = os.umask(0o027)
    try:
        export(str(trained_run.out_dir / "ckpt_best.pt"), str(tmp_path / "repo"), device="cpu", verify=False,
               optimize=False)
    finally:
        os.umask(old)
    paths = [tmp_path / "repo", *(tmp_path / "repo").rglob("*")]
    assert len(paths) > 5
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~0o027
        assert p.stat().st_mode & 0o777 == want, f"{p}: {oct(p.stat().st_mode & 0o777)}"


# ------------------------------------------------------------------ 10.12 secrets
def test_s3_secret_never_appears_in_repr():
    from captioner.io.storage import S3Settings

    s = S3Settings.from_env("127.0.0.1:9000", "AKIAPROBE", "s3cr3t-probe-value", False)
    assert s.secret_key == "s3cr3t-probe-value"
    for text in (repr(s), str(s), f"{s}", repr([s])):
        assert "s3cr3t-probe-value" not in text, text


def _pki(d: Path) -> dict:
    """A CA, a server certificate for 127.0.0.1 and a client certificate signed by it, and an
    impostor CA + server certificate for the same address (what a man in the middle presents)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(cn, key, issuer_cn, issuer_key, ca=False, san=False):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            import ipaddress

            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                             x509.DNSName("localhost")]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    out = {}

    def save(name, obj):
        p = d / name
        if isinstance(obj, x509.Certificate):
            p.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        else:
            p.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
        out[name] = p
    for tag in ("", "evil-"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        save(f"{tag}ca.pem", cert(f"{tag}ca", ca_key, f"{tag}ca", ca_key, ca=True))
        srv_key = ec.generate_private_key(ec.SECP256R1())
        save(f"{tag}server.key", srv_key)
        save(f"{tag}server.pem", cert("127.0.0.1", srv_key, f"{tag}ca", ca_key, san=True))
        if not tag:
            cli_key = ec.generate_private_key(ec.SECP256R1())
            save("client.key", cli_key)
            save("client.pem", cert("captioner-client", cli_key, "ca", ca_key))
    return out


def _tls_server(pki: dict, tag: str = ""):
    """gRPC server speaking the KServe v2 / Triton protocol over mutual TLS, as Triton does with
    --grpc-use-ssl-mutual (server docs/customization_guide/inference_protocols.md, "SSL/TLS":
    server cert + key, root cert that client certificates must chain to). Its one model answers
    each image with its byte count, enough to show the request crossed the channel intact."""
    from concurrent import futures

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from captioner.core.names import CAPTION

    class Echo(service_pb2_grpc.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):  # `caption --url` checks liveness once before any image
            return service_pb2.ServerLiveResponse(live=True)

        def ServerReady(self, request, context):
            return service_pb2.ServerReadyResponse(ready=True)

        def ModelInfer(self, request, context):
            raw = request.raw_input_contents[0]
            sizes, i = [], 0
            while i < len(raw):
                n = struct.unpack_from("<I", raw, i)[0]
                sizes.append(n)
                i += 4 + n
            caps = [f"{n} bytes over tls".encode() for n in sizes]
            resp = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
            o = resp.outputs.add(name=CAPTION, datatype="BYTES", shape=[len(caps), 1])
            assert o.name == CAPTION
            resp.raw_output_contents.append(b"".join(struct.pack("<I", len(c)) + c for c in caps))
            return resp

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    creds = grpc.ssl_server_credentials([(pki[f"{tag}server.key"].read_bytes(), pki[f"{tag}server.pem"].read_bytes())],
                                        root_certificates=pki["ca.pem"].read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("case", ["mutual-tls", "no-ssl-flag", "impostor-server", "no-client-cert"])
def test_caption_url_over_tls(tmp_path, case):
    pki = _pki(tmp_path)
    server, url = _tls_server(pki, "evil-" if case == "impostor-server" else "")
    img = tmp_path / "x.jpg"
    img.write_bytes(_jpeg())
    tls = ["--ssl", "--root-certificates", str(pki["ca.pem"])]
    client = ["--private-key", str(pki["client.key"]), "--certificate-chain", str(pki["client.pem"])]
    args = {"mutual-tls": tls + client, "no-ssl-flag": [], "impostor-server": tls + client,
            "no-client-cert": tls}[case]
    try:
        r = subprocess.run([sys.executable, "-m", "captioner", "caption", str(img), "--url", url, *args],
                           env=ENV, capture_output=True, text=True, timeout=120)
    finally:
        server.stop(0)
    if case == "mutual-tls":
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{img}\t{img.stat().st_size} bytes over tls"
    else:  # plaintext to a TLS port, a certificate from another CA, no client certificate: refused
        # refused at the one liveness call, as one line naming the server (not one error per image)
        assert r.returncode != 0 and "bytes over tls" not in r.stdout, r.stderr
        assert r.stderr.count(f"cannot reach the model server at {url}") == 1, r.stderr
