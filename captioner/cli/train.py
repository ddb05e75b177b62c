"""`captioner train`, `evaluate` and `report`: training runs, their evaluation and their report."""
from __future__ import annotations

import argparse
import json
import logging

from captioner.cli.args import COUNT_OR_ALL, decode_args, decode_params

log = logging.getLogger("captioner")


def cmd_train(a, overrides):
    from captioner.core.config import load_config
    from captioner.training.train import train

    cfg = load_config(a.config, overrides)
    from captioner.modeling.encoders import check_encoder

    check_encoder(cfg.model.encoder, cfg.model.pretrained, cfg.model.encoder_weights)  # before any data work
    res = train(cfg, resume=a.resume, progress=not a.no_progress, overwrite=a.overwrite)
    if res.best["value"] > float("-inf"):
        log.info("done: step %d, best %s %.4f at step %d; checkpoints in %s", res.step, res.best["metric"],
                 res.best["value"], res.best["step"], res.out_dir)


def cmd_evaluate(a, _):
    from captioner.training.evaluate import evaluate

    r = evaluate(a.checkpoint, split=a.split, out_dir=a.out, data_source=a.data, params=decode_params(a),
                 max_images=a.max_images, meteor=not a.no_meteor)
    print(json.dumps(r["metrics"], indent=2))
    print(f"wrote {r['out_dir']}/metrics.json and samples.html")


def cmd_report(a, _):
    from captioner.training.report import write_report

    path, _m = write_report(a.run, a.out, a.samples)
    print(path)


def _lazy_epilog(parser: argparse.ArgumentParser, make) -> None:
    """Compute `parser`'s epilog when its help is printed, not when the CLI starts: only `train
    --help` needs every preset read and the configuration imported."""
    plain = parser.format_help

    def format_help() -> str:
        if parser.epilog is None:
            parser.epilog = make()
        return plain()

    parser.format_help = format_help


def _preset_summary(text: str) -> str:
    """A preset's leading comment up to the end of its first sentence (whole, never cut)."""
    import re

    words = []
    for ln in text.splitlines():
        if not ln.startswith("#"):
            break
        words.append(ln.lstrip("#").strip())
    joined = " ".join(w for w in words if w)
    m = re.search(r"^.*?\.(?=\s|$)", joined)
    return m.group(0) if m else joined


def _first_sentence(text: str, limit: int = 100) -> str:
    """A config key's note in `train --help`: the first sentence of its help, cut at `limit` characters."""
    first = text.split(". ")[0].rstrip(".") if text else ""
    return first if len(first) <= limit else first[:limit - 1] + "…"


def _presets_and_config_keys() -> str:
    """`train --help` epilog: the presets and every config key with its help, from the dataclasses."""
    import dataclasses
    import textwrap

    from captioner.core.config import PRESET_DIR, ExperimentConfig

    lines = ["presets (--config NAME):"]
    for f in sorted(PRESET_DIR.glob("*.yaml")):
        lines += textwrap.wrap(_preset_summary(f.read_text()), 100, initial_indent=f"  {f.stem:<14} ",
                               subsequent_indent=" " * 17, break_on_hyphens=False)
    lines.append("")
    lines.append("config keys (--section.key=value; the preset or YAML sets some, the rest keep these defaults):")
    cfg = ExperimentConfig()
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        lines.append(f"  {sec.name}:")
        for f in dataclasses.fields(obj):
            note = _first_sentence(f.metadata.get("help", ""))
            lines.append(f"    {sec.name}.{f.name}={getattr(obj, f.name)!r}" + (f"  # {note}" if note else ""))
    return "\n".join(lines)


def add_train(sub, common: dict) -> None:
    s = sub.add_parser("train", **common, help="train (one process, or under torchrun for DDP)", description=(
        "Train from a config preset or YAML file plus --section.key=value overrides, e.g.\n"
        "  captioner train --config tiny-cpu --data.source=data/synth --train.out_dir=runs/x --train.epochs=5\n"
        "Several processes: torchrun --nproc_per_node=N -m captioner train ..."))
    _lazy_epilog(s, _presets_and_config_keys)  # built at `train --help` only
    s.add_argument("--config", default="tiny-cpu", help="preset name (configs/*.yaml) or YAML path")
    s.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt_latest.pt, else from the model "
                   "store (--train.publish_uri); start fresh when neither has one")
    s.add_argument("--overwrite", action="store_true", help="replace a run already in OUT_DIR / the model store "
                   "(without --resume or --overwrite such a run is refused and left untouched)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_train, overrides_ok=True)


def add_evaluate(sub, common: dict) -> None:
    s = sub.add_parser("evaluate", **common, help="caption a split and report BLEU/METEOR/ROUGE-L/CIDEr-D")
    s.add_argument("checkpoint", help="checkpoint file or run folder (uses ckpt_best.pt)")
    s.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to caption")
    s.add_argument("--data", default=None, help="data source (default: the one in the checkpoint's config)")
    s.add_argument("--out", default=None, help="output folder (default: RUN/eval_SPLIT for greedy decoding of all images; "
                        "other settings add them to the name, e.g. RUN/eval_test_beam3)")
    s.add_argument("--max-images", type=COUNT_OR_ALL, default=0, help="evaluate at most this many images (0 = all)")
    s.add_argument("--no-meteor", action="store_true", help="skip METEOR (Java) even where Java exists")
    decode_args(s)
    s.set_defaults(fn=cmd_evaluate)


def add_report(sub, common: dict) -> None:
    s = sub.add_parser("report", **common, help="write a training run's HTML report (curves, numbers, config, data, "
                                                "worst samples) and print its path",
                       description="One self-contained HTML page for a run trained by `captioner train`: its "
                                   "TensorBoard curves as images, the throughput and cost numbers, config, data "
                                   "summary and the worst captions of its evaluation (eval_*/samples.html).")
    s.add_argument("run", help="run folder, a checkpoint in it, or the run's model store URI (s3://bucket/prefix)")
    s.add_argument("--out", default=None, help="where to write the HTML (default RUN/report.html; for s3:// "
                                               "./NAME-report.html)")
    s.add_argument("--samples", default=None, help="an evaluation's samples.html (default RUN/eval_*/samples.html)")
    s.set_defaults(fn=cmd_report)
