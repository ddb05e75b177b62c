"""The dataset manifest (`captioner.data.manifest`): its schema is validated when read, and
tar members and manifest keys cannot write outside the extraction cache.

Hostile inputs: each test performs the attack with probes generated here and checks the
bounded outcome: refused with an error naming the offender, nothing written outside the
target folder, memory bounded (generous margins, never timings)."""
import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from tests.helpers import files_under, jpeg_bytes


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
    good = jpeg_bytes()
    members = [(f"{outside}/k1.jpg", b"x"), ("../k1.jpg", b"x"), ("k1.jpg/../../k1.jpg", b"x"),
               ("k1.pth", b"x"), ("k1.jpg", good), ("k1.json", b"{}")]
    _shard_store(tmp_path / "ds", members, [{"key": "k1", "ext": "jpg"}])
    store, manifest = open_shard_source(str(tmp_path / "ds"))
    recs = materialize(store, manifest, "val", tmp_path / "cache")
    assert [Path(r.path).name for r in recs] == ["k1.jpg"] and Path(recs[0].path).read_bytes() == good
    assert files_under(tmp_path / "cache") == {"k1.jpg", "records.json"}
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

    _shard_store(tmp_path / "ds", [("k1.jpg", jpeg_bytes())], [{"key": "k1", "ext": "jpg"}])
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
