"""The exported repository (`captioner.export.exporter`): the held-out images its parity and
int8 quality checks run on, and the permissions of what it writes."""
import os
import subprocess
import sys

from captioner.data.manifest import open_shard_source
from captioner.export.exporter import held_out_records, sample_images
from captioner.modeling.checkpoint import load_checkpoint


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


def test_held_out_images_of_a_shard_dataset_are_its_manifest_test_split(trained_run, synth_dir, tmp_path):
    """The parity / int8 quality checks run on the held-out test split that a shard dataset's manifest
    fixes (they used to fall back to generated scenes for such a dataset)."""
    data = tmp_path / "data"
    r = subprocess.run([sys.executable, "-m", "captioner", "ingest", str(synth_dir), str(data), "--val-fraction",
                        "0.15", "--test-fraction", "0.15", "--no-progress"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    ck = load_checkpoint(trained_run.out_dir)
    ck.config.data.source = str(data)
    _, manifest = open_shard_source(str(data))
    test_keys = [f"{it.key}.{it.ext}" for it in manifest.items_in("test")]  # image ids: the file names
    recs = held_out_records(ck, 0, tmp_path / "cache")
    assert sorted(r.image_id for r in recs) == sorted(test_keys) and all(r.captions for r in recs)
    got = sample_images(ck, 4)
    assert len(got) == 4 and {n for n, _ in got} <= set(test_keys), [n for n, _ in got]
