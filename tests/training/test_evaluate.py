"""`captioner evaluate` (`captioner.training.evaluate`) and `captioner caption` on a checkpoint."""
import json
import os
import subprocess
import sys


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
