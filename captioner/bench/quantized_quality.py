"""Quantized vs fp32 caption quality on a run's held-out test split (a report, not a timed test).

    python -m captioner.bench.quantized_quality RUN/ckpt_best.pt [--kinds int8,int4] [--max-images N] [--json]

Exports the checkpoint once per kind (fp32; int8: every graph dynamic int8 with per-channel
weights; int4: the decode loop's step graph 4-bit weight-only MatMulNBits, the encoder int8),
captions every image of the held-out test split (the split the dataset's manifest fixes for a
`captioner ingest` dataset) through the served path (onnxruntime encoder + decode_loop's
in-process decoder, greedy), and reports CIDEr-D / BLEU-4 of each, the relative CIDEr-D change
against fp32, and the caption agreement rate (share of images whose caption equals the fp32
one). Goal: each quantized kind's CIDEr-D within 2% of fp32.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

KINDS = ("int8", "int4")


def caption_repo(repo: Path, recs, pre, batch: int = 16) -> dict[str, str]:
    from captioner.core.names import DECODE_LOOP
    from captioner.serving.core import DecodeLoop, image_bytes_to_pixels, params_for
    from captioner.serving.onnx_runtime import OrtCaptioner

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


def run(checkpoint: str, max_images: int = 0, work: str | None = None, kinds: tuple[str, ...] = KINDS) -> dict:
    from captioner.data.samples import held_out_records
    from captioner.export.exporter import export
    from captioner.modeling.checkpoint import load_checkpoint
    from captioner.training.metrics import caption_metrics

    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"--kinds takes a comma-separated subset of {','.join(KINDS)}, got {','.join(kinds)!r}")
    work_dir = Path(work or tempfile.mkdtemp(prefix="captioner-quality-"))
    ck = load_checkpoint(checkpoint)
    recs = held_out_records(ck.config.data, max_images, work_dir / "images")
    if not recs:
        raise ValueError(f"no held-out test images for {checkpoint}")
    refs = {r.image_id: r.captions for r in recs}
    res = {"checkpoint": str(checkpoint), "source": ck.config.data.source, "split": "test", "images": len(recs),
           "kinds": ["fp32", *kinds]}
    caps = {}
    for kind in res["kinds"]:
        repo = work_dir / kind
        q = None if kind == "fp32" else kind
        export(checkpoint, str(repo), device="cpu", quantize=q, verify=q is None, force=True)
        caps[kind] = caption_repo(repo, recs, ck.preprocess)
        m = caption_metrics(refs, caps[kind], meteor=False)
        res[kind] = {"CIDEr-D": m.get("CIDEr-D", m.get("CIDEr")), "BLEU-4": m.get("BLEU-4")}
        if kind != "fp32":
            f, v = res["fp32"]["CIDEr-D"], res[kind]["CIDEr-D"]
            change = (v - f) / f if f else float("nan")
            res[kind].update(cider_relative_change=change, within_2_percent=abs(change) <= 0.02,
                             caption_agreement=sum(caps["fp32"][k] == caps[kind][k] for k in refs) / len(refs))
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="captioner.bench.quantized_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run's ckpt_best.pt (its config names the dataset)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"quantized kinds to compare with fp32 (of {KINDS})")
    p.add_argument("--max-images", type=int, default=0, help="cap on test images (0 = the whole test split)")
    p.add_argument("--work", help="folder for the exported repositories and extracted images")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    try:
        r = run(a.checkpoint, a.max_images, a.work, tuple(k for k in a.kinds.split(",") if k))
    except ValueError as e:
        p.error(str(e))
    if a.json:
        print(json.dumps(r))
        return
    print(f"held-out {r['split']} split of {r['source']}: {r['images']} images, greedy, served path")
    print("| weights | CIDEr-D | BLEU-4 | CIDEr-D vs fp32 | captions equal to fp32 |\n|---|---|---|---|---|")
    for k in r["kinds"]:
        q = r[k]
        rel = f"{100 * q['cider_relative_change']:+.2f}%" if k != "fp32" else "-"
        agree = f"{100 * q['caption_agreement']:.1f}%" if k != "fp32" else "-"
        print(f"| {k} | {q['CIDEr-D']:.3f} | {q['BLEU-4']:.3f} | {rel} | {agree} |")
    for k in r["kinds"][1:]:
        print(f"{k} CIDEr-D change {100 * r[k]['cider_relative_change']:+.2f}% (goal within 2%: "
              f"{'met' if r[k]['within_2_percent'] else 'NOT met'}); caption agreement "
              f"{100 * r[k]['caption_agreement']:.1f}%")


if __name__ == "__main__":
    main()
