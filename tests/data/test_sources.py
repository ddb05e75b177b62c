import json
from pathlib import Path

import pytest
from PIL import Image

from captioner.core.preprocess import PreprocessConfig
from captioner.data.ingest import ingest
from captioner.data.sources import assign_splits, read_records, summarize, verify_images
from tests.helpers import jpeg_bytes, probe_opts


def _img(path: Path, size=(40, 30), color=(200, 10, 10)):
    Image.new("RGB", size, color).save(path)


def test_flickr_reader_handles_kaggle_quirks(tmp_path):
    imgs = tmp_path / "flickr30k_images" / "flickr30k_images"  # the Kaggle zip nests the folder
    imgs.mkdir(parents=True)
    for n in ("1.jpg", "2.jpg", "3.jpg", "2199200615.jpg"):
        _img(imgs / n)
    (tmp_path / "results.csv").write_text(
        "image_name| comment_number| comment\n"
        "1.jpg| 0|  A dog runs .  \n"
        "1.jpg|1|A dog | with a pipe in the caption .\n"
        "2.jpg| 0| \n"                                  # empty caption
        "2.jpg| 1| Two cats .\n"
        "2199200615.jpg| 4 A dog runs across the grass .\n"  # the public file's malformed row
        "missing.jpg| 0| Not there .\n"                  # missing image
        "garbage line without separators\n"
    )
    recs, summary = read_records(tmp_path)
    by = {r.image_id: r for r in recs}
    assert by["1.jpg"].captions == ["A dog runs .", "A dog | with a pipe in the caption ."]
    assert by["2.jpg"].captions == ["Two cats ."]
    assert by["2199200615.jpg"].captions == ["A dog runs across the grass ."]
    assert "3.jpg" not in by  # image without captions
    assert summary.skipped["missing image file"] == ["missing.jpg"]
    assert len(summary.skipped["empty caption"]) == 1 and "2.jpg" in summary.skipped["empty caption"][0]
    assert len(summary.skipped["malformed row"]) == 1
    assert summary.repaired == ["results.csv:6"]


def test_bad_images_are_skipped_by_name(synth_copy):
    imgs = sorted((synth_copy / "flickr30k_images").glob("*.jpg"))
    imgs[0].write_bytes(imgs[0].read_bytes()[:300])  # truncated JPEG
    imgs[1].write_bytes(b"this is not an image")
    imgs[2].unlink()
    recs, summary = read_records(synth_copy)
    recs = verify_images(recs, summary, PreprocessConfig().max_pixels, progress=False)
    assert summary.skipped["missing image file"] == [imgs[2].name]
    assert sorted(summary.skipped["unreadable image"]) == sorted([imgs[0].name, imgs[1].name])
    assert len(recs) == 77
    summarize(recs, summary)
    assert summary.to_dict()["skipped"]["unreadable image"]["count"] == 2


def test_karpathy_and_coco_readers(tmp_path):
    root = tmp_path / "images"
    (root / "val2014").mkdir(parents=True)
    _img(root / "val2014" / "a.jpg")
    _img(root / "b.jpg")
    kp = tmp_path / "dataset_coco.json"
    kp.write_text(json.dumps({"dataset": "coco", "images": [
        {"filename": "a.jpg", "filepath": "val2014", "split": "restval", "sentences": [{"raw": "A thing."}, {"raw": ""}]},
        {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "Another thing."}]},
    ]}))
    recs, summary = read_records(kp, image_root=str(root))
    assert [(r.image_id, r.split, r.captions) for r in recs] == [("a.jpg", "train", ["A thing."]),
                                                                  ("b.jpg", "test", ["Another thing."])]
    assert summary.skipped["empty caption"] == ["a.jpg"]
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "b.jpg"}, {"id": 2, "file_name": "nope.jpg"}],
                                "annotations": [{"image_id": 1, "caption": "x y"}, {"image_id": 2, "caption": "z"},
                                                {"image_id": 9, "caption": "orphan"}]}))
    recs, summary = read_records(coco, image_root=str(root))
    assert [(r.image_id, r.captions) for r in recs] == [("b.jpg", ["x y"])]
    assert summary.skipped["missing image file"] == ["nope.jpg"]
    assert summary.skipped["caption for unknown image id"] == ["9"]


def test_split_is_by_image_never_by_caption_row(synth_dir):
    recs, _ = read_records(synth_dir)
    assign_splits(recs, 0.2, 0.2, seed=1)
    # the caption rows of results.csv, mapped to the split their image got
    rows = [ln.split("|")[0].strip() for ln in (synth_dir / "results.csv").read_text().splitlines()[1:]]
    split_of = {}
    for r in recs:
        assert r.image_id not in split_of, "an image appears twice"
        split_of[r.image_id] = r.split
    per_image_splits = {}
    for name in rows:
        per_image_splits.setdefault(name, set()).add(split_of[name])
    assert all(len(s) == 1 for s in per_image_splits.values()), "an image's captions span splits"
    sets = {s: {r.image_id for r in recs if r.split == s} for s in ("train", "val", "test")}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert all(sets.values()), sets
    # stable: adding images never moves an existing image to another split
    before = dict(split_of)
    more, _ = read_records(synth_dir)
    assign_splits(more[:40], 0.2, 0.2, seed=1)
    assert all(before[r.image_id] == r.split for r in more[:40])


def test_csv_image_names_are_confined_to_the_image_root(tmp_path):
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    (secret_dir / "id_rsa.jpg").write_bytes(jpeg_bytes((1, 2, 3)))
    src = tmp_path / "ds"
    (src / "flickr30k_images").mkdir(parents=True)
    (src / "flickr30k_images" / "ok.jpg").write_bytes(jpeg_bytes())
    (src / "results.csv").write_text(
        "image_name| comment_number| comment\n"
        "ok.jpg| 0| a red square\n"
        f"{secret_dir}/id_rsa.jpg| 0| an absolute name\n"
        "../../secrets/id_rsa.jpg| 0| a relative escape\n"
        "sub/../../../secrets/id_rsa.jpg| 0| a hidden escape\n")
    r = ingest(str(src), str(tmp_path / "out"), probe_opts())
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
    (tmp_path / "secrets" / "x.jpg").write_bytes(jpeg_bytes())
    root = tmp_path / "ds" / "images"
    root.mkdir(parents=True)
    (root / "ok.jpg").write_bytes(jpeg_bytes())
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
