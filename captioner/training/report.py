"""The run report: one self-contained HTML page (curves as embedded PNGs, no external file)
for a training run in a local folder or the model store (s3://), as `captioner report`
writes it and the pipeline's evaluate step outputs it for the Kubeflow UI, plus the numbers
the KFP run comparison shows (`RunReport.metrics`).

It reads what training leaves in the run folder: the TensorBoard events (tb/, read with
TensorBoard's own reader, captioner/training/board.py), config.yaml, data_summary.json, and
the evaluation's samples.html (the worst captions first) when there is one.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from captioner.io.storage import is_s3, open_store
from captioner.training import board as tb

log = logging.getLogger(__name__)
REPORT_FILE = "report.html"
WORST_SAMPLES = 8
# Download only these from a store (never the checkpoints).
_WANTED = ("config.yaml", "data_summary.json")


class ReportError(ValueError):
    """The location holds no training run; the message names it."""


@dataclass
class RunData:
    where: str
    scalars: dict
    config: str = ""
    data: dict = field(default_factory=dict)
    samples_html: str = ""


@dataclass
class RunReport:
    html: str
    metrics: dict  # for KFP Metrics: name -> number


# ------------------------------------------------------------------ reading a run
def _fetch_run(run: str, into: Path, samples: str | None) -> RunData:
    if not is_s3(run) and Path(run).is_file():  # a checkpoint: its run folder
        run = str(Path(run).parent)
    if not is_s3(run) and not Path(run).is_dir():
        raise ReportError(f"report: {run!r} is neither a run folder nor an s3:// run URI")
    store = open_store(run)
    keys = store.list()
    events = [k for k in keys if k.startswith(tb.TB_DIR + "/")]
    if not events:
        raise ReportError(f"report: no TensorBoard events under {run.rstrip('/')}/{tb.TB_DIR}/ (a run trained by "
                          "`captioner train` with train.tensorboard on, or its model store URI)")
    for k in [*events, *(k for k in _WANTED if k in keys)]:
        store.download(k, into / k)
    d = RunData(run, tb.read_scalars(into / tb.TB_DIR))
    if (into / "config.yaml").exists():
        d.config = (into / "config.yaml").read_text()
    if (into / "data_summary.json").exists():
        d.data = json.loads((into / "data_summary.json").read_text())
    if samples:
        d.samples_html = Path(samples).read_text()
    else:  # `captioner evaluate RUN` writes RUN/eval_<split>/samples.html; prefer the test split
        found = sorted((k for k in keys if re.fullmatch(r"eval_[^/]+/samples\.html", k)),
                       key=lambda k: (k != "eval_test/samples.html", k))
        if found:
            d.samples_html = store.get_bytes(found[0]).decode()
    return d


# ------------------------------------------------------------------ numbers
def _last(s: dict, tag: str):
    return s[tag][-1][1] if s.get(tag) else None


def _median(s: dict, tag: str):
    vals = [v for _, v in s.get(tag, [])][1:] or [v for _, v in s.get(tag, [])]  # step 1 includes start-up
    return statistics.median(vals) if vals else None


def run_metrics(d: RunData) -> dict:
    """The numbers the run comparison needs (KFP Metrics) and the report's table."""
    s = d.scalars
    cfg = yaml.safe_load(d.config) if d.config else {}
    t = cfg.get("train", {})
    m: dict = {}
    steps = max((st for series in s.values() for st, _ in series), default=0)
    m["steps"] = steps
    if s.get(tb.LOSS):
        m["train_loss"] = _last(s, tb.LOSS)
    if s.get(tb.VAL_LOSS):
        m["val_loss"] = _last(s, tb.VAL_LOSS)
    best = t.get("best_metric", "CIDEr")
    if s.get(tb.VAL_PREFIX + best):
        m[f"val_{best}_last"] = _last(s, tb.VAL_PREFIX + best)
        m[f"val_{best}_best"] = max(v for _, v in s[tb.VAL_PREFIX + best])
    for tag, name in ((tb.PAIRS_S_GPU, "pairs_per_s_per_gpu"), (tb.IMAGES_S_GPU, "images_per_s_per_gpu"),
                      (tb.PAIRS_S, "pairs_per_s"), (tb.TOKENS_S, "tokens_per_s")):
        v = _median(s, tag)
        if v is not None:
            m[name] = v
    if s.get(tb.CUDA_MAX_MEM):
        m["cuda_max_memory_gib"] = max(v for _, v in s[tb.CUDA_MAX_MEM])
    if s.get(tb.COST):
        m["cost_usd_measured"] = _last(s, tb.COST)
    est = _estimate(d, m, t)
    if est is not None:
        m["cost_usd_estimated"] = est.cost
        m["gpu_hours_estimated"] = est.gpu_hours
    return {k: round(float(v), 6) for k, v in m.items()}


def _estimate(d: RunData, m: dict, t: dict):
    """What the cluster's cost guard (pytorchjob.estimate_cost) says for this run's size, at its
    default throughput, to compare with the measured cost."""
    from captioner.cluster.pytorchjob import DEFAULT_PAIRS_PER_S_PER_GPU, DEFAULT_PRICE_PER_GPU_HOUR, estimate_cost

    data = d.data or {}
    images, captions = data.get("images") or 0, data.get("captions") or 0
    train_images = (data.get("per_split") or {}).get("train", images)
    if not (images and captions and m.get("pairs_per_s_per_gpu")):
        return None
    pairs_per_epoch = captions * train_images / images
    gpus = max(1, round((m.get("pairs_per_s") or 0) / m["pairs_per_s_per_gpu"]))
    price = float(t.get("price_per_gpu_hour", DEFAULT_PRICE_PER_GPU_HOUR))
    epochs: float = int(t.get("epochs", 1))
    if t.get("max_steps"):  # a step budget: the pairs those steps see
        pairs_per_step = int(t.get("batch_size", 1)) * int(t.get("grad_accum_steps", 1)) * gpus * captions / images
        epochs = int(t["max_steps"]) * pairs_per_step / pairs_per_epoch
    return estimate_cost(int(pairs_per_epoch), epochs, DEFAULT_PAIRS_PER_S_PER_GPU, gpus, price)


# ------------------------------------------------------------------ curves
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def curves(s: dict) -> list[tuple[str, str]]:
    """(title, base64 PNG) of each chart, rendered headless (matplotlib's Agg canvas)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    charts = [("Loss", [(tb.LOSS, "train"), (tb.VAL_LOSS, "validation")], False),
              ("Learning rate", [(tb.LR, "lr")], False),
              ("Validation caption metrics", [(t, t[len(tb.VAL_PREFIX):]) for t in sorted(s)
                                              if t.startswith(tb.VAL_PREFIX) and t != tb.VAL_LOSS], True),
              ("Throughput per GPU", [(tb.PAIRS_S_GPU, "pairs/s"), (tb.IMAGES_S_GPU, "images/s")], False),
              ("Gradient norm (before clipping)", [(tb.GRAD_NORM, "grad norm")], False),
              ("Cost so far (USD)", [(tb.COST, "$")], False),
              ("CUDA max memory (GiB)", [(tb.CUDA_MAX_MEM, "GiB")], False)]
    out = []
    for title, series, markers in charts:
        series = [(tag, label) for tag, label in series if s.get(tag)]
        if not series:
            continue
        fig = Figure(figsize=(6, 3.2))
        ax = fig.add_subplot()
        for tag, label in series:
            xs, ys = zip(*s[tag])
            ax.plot(xs, ys, label=label, marker="o" if markers or len(xs) < 4 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
        out.append((title, _png(fig)))
    return out


# ------------------------------------------------------------------ HTML
def _worst_rows(samples_html: str, n: int = WORST_SAMPLES) -> str:
    """The first n rows of samples.html's table (captioner/evaluate.samples_html sorts the
    worst CIDEr-D first), with its header row."""
    m = re.search(r"<table>(.*?)</table>", samples_html, re.S)
    if not m:
        return ""
    rows = re.findall(r"<tr>.*?</tr>", m.group(1), re.S)
    return "<table id='worst'>" + "".join(rows[: n + 1]) + "</table>" if len(rows) > 1 else ""


_LABELS = {"steps": "optimizer steps", "train_loss": "train loss (last)", "val_loss": "validation loss (last)",
           "pairs_per_s_per_gpu": "pairs/s per GPU (median)", "images_per_s_per_gpu": "images/s per GPU (median)",
           "pairs_per_s": "pairs/s, all GPUs (median)", "tokens_per_s": "tokens/s, all GPUs (median)",
           "cuda_max_memory_gib": "CUDA max memory (GiB)", "cost_usd_measured": "cost so far, measured (USD)",
           "cost_usd_estimated": "cost guard's estimate for the whole run (USD)",
           "gpu_hours_estimated": "cost guard's estimate (GPU-hours)"}


def render(d: RunData, metrics: dict) -> str:
    e = html.escape
    def label(k: str) -> str:
        if k.startswith("val_") and k.endswith(("_last", "_best")):
            return f"validation {k[4:-5]} ({k[-4:]})"
        return _LABELS.get(k, k)

    rows = "".join(f"<tr><th>{e(label(k))}</th><td>{v:,.4g}</td></tr>" for k, v in metrics.items())
    imgs = "".join(f"<figure><img class='curve' alt='{e(t)}' src='data:image/png;base64,{b}'>"
                   f"<figcaption>{e(t)}</figcaption></figure>" for t, b in curves(d.scalars))
    data = d.data or {}
    data_rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(json.dumps(v) if isinstance(v, (dict, list)) else str(v))}"
                        f"</td></tr>" for k, v in data.items() if k not in ("skipped_items",))
    worst = _worst_rows(d.samples_html) if d.samples_html else ""
    worst_part = (f"<h2>Worst samples</h2><p>Lowest per-image CIDEr-D first (from the evaluation's samples.html).</p>"
                  f"{worst}") if worst else "<h2>Worst samples</h2><p>No evaluation of this run yet.</p>"
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>captioner run report: {e(d.where)}</title>"
            "<style>body{font-family:sans-serif;max-width:1300px;margin:auto}"
            "figure{display:inline-block;margin:6px}img.curve{width:540px}"
            "table{border-collapse:collapse}td,th{text-align:left;padding:4px 8px;border-bottom:1px solid #ddd;"
            "vertical-align:top}pre{background:#f6f6f6;padding:8px;overflow:auto;max-height:400px}</style></head><body>"
            f"<h1>Run report</h1><p><code>{e(d.where)}</code></p>"
            f"<h2>Numbers</h2><table id='metrics'>{rows}</table>"
            "<p>The measured cost counts one GPU per rank for the wall time of training; the estimate is "
            "what the cluster's cost guard computes before launching (its default throughput).</p>"
            f"<h2>Curves</h2><div id='curves'>{imgs}</div>"
            f"<h2>Data</h2><table id='data'>{data_rows}</table>"
            f"{worst_part}"
            f"<h2>Configuration</h2><pre id='config'>{e(d.config)}</pre>"
            "</body></html>")


def build_report(run: str, samples: str | None = None) -> RunReport:
    with tempfile.TemporaryDirectory(prefix="captioner-report-") as tmp:
        d = _fetch_run(str(run), Path(tmp), samples)
    m = run_metrics(d)
    return RunReport(render(d, m), m)


def default_path(run: str) -> Path:
    if is_s3(run):
        return Path.cwd() / (run.rstrip("/").rsplit("/", 1)[-1] + "-" + REPORT_FILE)
    p = Path(run)
    return (p.parent if p.is_file() else p) / REPORT_FILE


def write_report(run: str, out: str | Path | None = None, samples: str | None = None) -> tuple[Path, dict]:
    """Write the report of `run` (a run folder, a checkpoint in one, or an s3:// run URI) to
    `out` (default: RUN/report.html, or ./NAME-report.html for s3://); -> (path, metrics)."""
    r = build_report(run, samples)
    path = Path(out) if out else default_path(str(run))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(r.html)
    log.info("wrote the run report %s", path)
    return path, r.metrics
