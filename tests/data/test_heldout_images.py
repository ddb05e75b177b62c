"""Issue 13: the parity / int8 quality checks run on the held-out test split that a shard
dataset's manifest fixes (they used to fall back to generated scenes for such a dataset)."""
import subprocess
import sys

from captioner.data.manifest import open_shard_source
from captioner.export.exporter import held_out_records, sample_images
from captioner.modeling.checkpoint import load_checkpoint


def test_held_out_images_of_a_shard_dataset_are_its_manifest_test_split(trained_run, synth_dir, tmp_path):
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
