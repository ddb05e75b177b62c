"""int8 vs fp32 caption quality on a run's held-out test split (a report, not a timed test).

    python -m benchmarks.int8_quality RUN/ckpt_best.pt [--max-images N] [--json]

Exports the checkpoint twice (fp32, and int8 with per-channel weights), captions every image
of the held-out test split (the split the dataset's manifest fixes for a `captioner ingest`
dataset) through the served path (onnxruntime encoder + decode_loop's in-process decoder,
greedy), and reports CIDEr-D / BLEU-4 of both, the relative CIDEr-D change, and the caption
agreement rate (share of images whose int8 caption equals the fp32 one). Goal (issue 13):
int8 CIDEr-D within 2% of fp32.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def caption_repo(repo: Path, recs, pre, batch: int = 16) -> dict[str, str]:
    from captioner.names import DECODE_LOOP
    from captioner.onnx_runtime import OrtCaptioner
    from captioner.serving_core import DecodeLoop, image_bytes_to_pixels, params_for

    enc = OrtCaptioner(repo)
    loop = DecodeLoop.in_process(repo / DECODE_LOOP / "1")
    params = params_for(None, None, loop.s)
    out = {}
    for i in range(0, len(recs), batch):
        part = recs[i:i + batch]
        pixels = image_bytes_to_pixels(np.array([Path(r.path).read_bytes() for r in part], dtype=object), pre)
        _, cross = enc.run_encoder(pixels)
        out.update({r.image_id: c for r, c in zip(part, loop.caption(cross, params))})
    return out


def run(checkpoint: str, max_images: int = 0, work: str | None = None) -> dict:
    from captioner.checkpoint import load_checkpoint
    from captioner.export import export, held_out_records
    from captioner.metrics import caption_metrics

    work_dir = Path(work or tempfile.mkdtemp(prefix="captioner-int8-"))
    ck = load_checkpoint(checkpoint)
    recs = held_out_records(ck, max_images, work_dir / "images")
    if not recs:
        raise ValueError(f"no held-out test images for {checkpoint}")
    refs = {r.image_id: r.captions for r in recs}
    res = {"checkpoint": str(checkpoint), "source": ck.config.data.source, "split": "test", "images": len(recs)}
    caps = {}
    for kind, q in (("fp32", None), ("int8", "int8")):
        repo = work_dir / kind
        export(checkpoint, str(repo), device="cpu", quantize=q, verify=q is None)
        caps[kind] = caption_repo(repo, recs, ck.preprocess)
        m = caption_metrics(refs, caps[kind], meteor=False)
        res[kind] = {"CIDEr-D": m.get("CIDEr-D", m.get("CIDEr")), "BLEU-4": m.get("BLEU-4")}
    f, q = res["fp32"]["CIDEr-D"], res["int8"]["CIDEr-D"]
    res["cider_relative_change"] = (q - f) / f if f else float("nan")
    res["within_2_percent"] = abs(res["cider_relative_change"]) <= 0.02
    res["caption_agreement"] = sum(caps["fp32"][k] == caps["int8"][k] for k in refs) / len(refs)
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="benchmarks.int8_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run's ckpt_best.pt (its config names the dataset)")
    p.add_argument("--max-images", type=int, default=0, help="cap on test images (0 = the whole test split)")
    p.add_argument("--work", help="folder for the two exported repositories and extracted images")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    r = run(a.checkpoint, a.max_images, a.work)
    if a.json:
        print(json.dumps(r))
        return
    print(f"held-out {r['split']} split of {r['source']}: {r['images']} images, greedy, served path")
    print("| weights | CIDEr-D | BLEU-4 |\n|---|---|---|")
    for k in ("fp32", "int8"):
        print(f"| {k} | {r[k]['CIDEr-D']:.3f} | {r[k]['BLEU-4']:.3f} |")
    print(f"int8 CIDEr-D change {100 * r['cider_relative_change']:+.2f}% (goal within 2%: "
          f"{'met' if r['within_2_percent'] else 'NOT met'}); caption agreement {100 * r['caption_agreement']:.1f}%")


if __name__ == "__main__":
    main()
