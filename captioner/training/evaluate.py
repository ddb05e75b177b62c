"""`captioner evaluate`: caption a split with a checkpoint, score it, write metrics.json,
captions.json and samples.html."""
from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

import torch
from PIL import Image

from captioner.core.config import save_config
from captioner.core.decoding import DecodeParams
from captioner.core.errors import DataNotFoundError
from captioner.data.manifest import is_shard_source, materialize, open_shard_source
from captioner.data.sources import DataSummary, ImageRecord, assign_splits, by_split, load_split_arrays, read_records
from captioner.io.storage import is_s3
from captioner.modeling.checkpoint import load_checkpoint
from captioner.modeling.inference import caption_arrays
from captioner.training.metrics import score_captions

log = logging.getLogger(__name__)


def score_records(model, tok, pre, recs: list[ImageRecord], params: DecodeParams | None = None,
                  device="cpu", meteor: bool = True, batch_size: int = 32):
    """Caption `recs` and score against their references -> (metrics, {id: caption}, kept recs)."""
    metrics, res, kept, _ = _caption_and_score(model, tok, pre, recs, params, device, meteor, batch_size)
    return metrics, res, kept


def _caption_and_score(model, tok, pre, recs, params, device, meteor, batch_size=32):
    """-> (metrics, {id: caption}, records whose image loaded, {id: per-image CIDEr-D})."""
    pixels, kept = load_split_arrays(recs, pre)
    hyps = caption_arrays(model, tok, pixels, params, batch_size=batch_size, device=device)
    res = {r.image_id: h for r, h in zip(kept, hyps)}
    refs = {r.image_id: r.captions for r in kept}
    metrics, per_image = score_captions(refs, res, meteor=meteor)
    return metrics, res, kept, per_image


def _thumb(path: str, side: int = 160) -> str:
    try:
        im = Image.open(path).convert("RGB")
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except Exception:  # noqa: BLE001 - a thumbnail is cosmetic
        return ""


def describe_decoding(p: DecodeParams) -> str:
    if p.strategy == "sample":
        how = f"sampling (temperature {p.temperature:g}, top-p {p.top_p:g}, seed {p.seed})"
    elif p.strategy == "beam":
        how = f"beam search (beam {p.beam_size}, length penalty {p.length_penalty:g})"
    else:
        how = "greedy"
    extra = f", no repeated {p.no_repeat_ngram_size}-grams" if p.no_repeat_ngram_size else ""
    return f"{how}, at most {p.max_new_tokens} new tokens{extra}"


def samples_html(recs: list[ImageRecord], hyps: dict[str, str], metrics: dict, title: str,
                 per_image: dict[str, float], params: DecodeParams, n: int = 50) -> str:
    """The `n` lowest-scoring images first (per-image CIDEr-D), so mistakes are found quickly."""
    worst = sorted(recs, key=lambda r: (per_image.get(r.image_id, 0.0), r.image_id))[:n]
    rows = []
    for r in worst:
        refs = "".join(f"<li>{html.escape(c)}</li>" for c in r.captions)
        rows.append(f"<tr><td><img src='{_thumb(r.path)}' alt='{html.escape(r.image_id)}'></td>"
                    f"<td><b>{html.escape(hyps.get(r.image_id, ''))}</b><br><small>{html.escape(r.image_id)}</small></td>"
                    f"<td class='score'>{per_image.get(r.image_id, 0.0):.3f}</td>"
                    f"<td><ul>{refs}</ul></td></tr>")
    mt = " · ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    shown = (f"Showing the {len(worst)} lowest-scoring of {len(recs)} evaluated images, worst CIDEr-D first"
             if len(worst) < len(recs) else f"All {len(recs)} evaluated images, worst CIDEr-D first")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif}td{vertical-align:top;padding:6px;border-bottom:1px solid #ddd}"
            ".score{font-variant-numeric:tabular-nums}</style>"
            f"</head><body><h2>{html.escape(title)}</h2><p>{html.escape(mt)}</p>"
            f"<p>Decoding: {html.escape(describe_decoding(params))}.</p>"
            f"<p id='shown'>{html.escape(shown)}.</p>"
            "<table><tr><th>image</th><th>generated</th><th>CIDEr-D</th><th>references</th></tr>" + "".join(rows) +
            "</table></body></html>")


def eval_folder_name(split: str, p: DecodeParams, model_limit: int, max_images: int = 0) -> str:
    """`eval_SPLIT` for the defaults (greedy, the model's token limit, all images); other
    settings get their own folder, e.g. `eval_test_beam3_lp0.6`, so no result replaces another."""
    parts = []
    if p.strategy == "beam":
        parts += [f"beam{p.beam_size}", *([f"lp{p.length_penalty:g}"] if p.length_penalty != 1.0 else [])]
    elif p.strategy == "sample":
        parts += [f"sample-t{p.temperature:g}-p{p.top_p:g}-seed{p.seed}"]
    if p.no_repeat_ngram_size:
        parts.append(f"norepeat{p.no_repeat_ngram_size}")
    if p.max_new_tokens != model_limit:
        parts.append(f"max{p.max_new_tokens}")
    if max_images:
        parts.append(f"first{max_images}")
    return "_".join([f"eval_{split}", *parts])


def _check_source(src: str, from_checkpoint: bool) -> None:
    """A missing local data source: one line, and where the path came from."""
    if is_s3(src) or Path(src).exists():
        return
    if from_checkpoint:
        raise DataNotFoundError(f"data source not found: {src} (the path the run was trained on)",
                                hint="pass --data PATH: the same dataset where it is now (a folder, CSV/JSON, or a "
                                     "dataset written by `captioner ingest`)")
    raise DataNotFoundError(f"data source not found: {src}", hint="check --data")


def evaluate(checkpoint: str, split: str = "test", out_dir: str | None = None, data_source: str | None = None,
             params: DecodeParams | None = None, max_images: int = 0, meteor: bool = True) -> dict:
    ck = load_checkpoint(checkpoint)
    cfg = ck.config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ck.model.to(device)
    params = DecodeParams(**vars(params or DecodeParams()))
    params.max_new_tokens = min(params.max_new_tokens or ck.model.cfg.max_new_tokens, ck.model.cfg.max_new_tokens)
    src = data_source or cfg.data.source
    _check_source(src, from_checkpoint=not data_source)
    out = Path(out_dir or Path(ck.path).parent / eval_folder_name(split, params, ck.model.cfg.max_new_tokens,
                                                                   max_images))
    if (out / "metrics.json").exists():
        log.info("replacing the earlier evaluation with the same settings in %s", out)
    out.mkdir(parents=True, exist_ok=True)
    if is_shard_source(src):  # a dataset written by `captioner ingest`: its split is fixed
        store, manifest = open_shard_source(src)
        recs = materialize(store, manifest, split, out / "images", max_images)
        summary = DataSummary()
    else:
        recs, summary = read_records(src, cfg.data.format, cfg.data.image_root)
        assign_splits(recs, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
        recs = by_split(recs, split)
    if max_images:
        recs = recs[:max_images]
    if not recs:
        raise ValueError(f"no images in split '{split}' of {src}")
    log.info("evaluating %s on %d %s images of %s", ck.path, len(recs), split, src)
    metrics, hyps, kept, per_image = _caption_and_score(ck.model, ck.tokenizer, ck.preprocess, recs, params, device,
                                                        meteor)
    kept_ids = {r.image_id for r in kept}
    unreadable = [r.image_id for r in recs if r.image_id not in kept_ids]
    data = {"source": str(src), "split": split, "images": len(kept), "captions": sum(len(r.captions) for r in kept),
            "unreadable": {"count": len(unreadable), "items": unreadable[:50]}}
    if summary.images:  # a raw source was read: what reading all of it found
        data["source_summary"] = summary.to_dict()
    report = {"checkpoint": str(ck.path), "step": ck.step, "split": split, "images": len(kept),
              "decode": vars(params), "metrics": metrics, "data": data}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "captions.json").write_text(json.dumps(hyps, indent=2))
    (out / "samples.html").write_text(samples_html(kept, hyps, metrics, f"{split} samples, step {ck.step}",
                                                   per_image, params))
    save_config(cfg, out / "config.yaml")
    return {"metrics": metrics, "out_dir": str(out), "captions": hyps, "records": kept}


