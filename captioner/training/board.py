"""TensorBoard events of a training run (rank 0 only), under RUN/tb/.

`TrainBoard` is what train.py calls, through four named hooks:
- `start(cfg, summary)`: the resolved config and the data summary as text;
- `micro(batch)`: counts the images, caption pairs and target tokens of a micro-batch;
- `step(step, loss, lr, grad_norm)`: per optimizer step, the scalars of TRAIN_SCALARS;
- `validation(r, metrics, hyps)`: val loss, every caption metric, and the same few held-out
  images (image + generated/reference captions) each time, so progress is visible.
On ranks > 0 every hook does nothing. On `--resume` the writer purges every event past the
checkpoint step (SummaryWriter(purge_step=...): TensorBoard's reader drops events at or after
that step written before the restart), so the series continue without duplicates.

The cost so far is ranks x wall hours x `train.price_per_gpu_hour` (one GPU per rank: the
PyTorchJob and TrainJob builders start one process per GPU).
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from captioner.data.datasets import CaptionImageDataset, collate_grouped

log = logging.getLogger(__name__)
TB_DIR = "tb"  # under the run folder, mirrored to the model store with the checkpoints
N_SAMPLES = 4  # held-out images shown with their captions at every validation
# Tags, defined once: train.py writes them, the run report and the tests read them.
LOSS, LR, GRAD_NORM = "train/loss", "train/lr", "train/grad_norm"
IMAGES_S_GPU, PAIRS_S_GPU = "throughput/images_per_s_per_gpu", "throughput/pairs_per_s_per_gpu"
IMAGES_S, PAIRS_S, TOKENS_S = "throughput/images_per_s", "throughput/pairs_per_s", "throughput/tokens_per_s"
CUDA_MAX_MEM = "system/cuda_max_memory_gib"
COST = "cost/usd_so_far"
VAL_LOSS = "val/loss"
VAL_PREFIX = "val/"  # + each caption metric name (BLEU-4, CIDEr, ...)
TRAIN_SCALARS = (LOSS, LR, GRAD_NORM, IMAGES_S_GPU, PAIRS_S_GPU, IMAGES_S, PAIRS_S, TOKENS_S, COST)
CONFIG_TEXT, DATA_TEXT = "run/config", "run/data"


def grad_norm(model: torch.nn.Module, clip: float) -> float:
    """The total gradient norm before clipping (clips when clip > 0)."""
    params = [p for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))


class TrainBoard:
    """The run's TensorBoard writer; a no-op on ranks > 0 or with `train.tensorboard: false`."""

    def __init__(self, out: Path, main: bool, world: int, price_per_gpu_hour: float, resume_step: int | None,
                 enabled: bool = True, device: torch.device | None = None):
        self.world, self.price, self.device = world, price_per_gpu_hour, device or torch.device("cpu")
        self.writer = None
        self.sample_ids: list[str] = []
        self._reset_window()
        self.elapsed = 0.0  # training seconds (the cost clock), continued across --resume
        self._t_step = time.perf_counter()
        if not (main and enabled):
            return
        from torch.utils.tensorboard import SummaryWriter  # tensorboard loads only on the rank that writes

        logdir = Path(out) / TB_DIR
        if resume_step is None and logdir.exists():  # a fresh run: the events of a replaced one go
            shutil.rmtree(logdir)
        if resume_step is not None:
            cost = last_value(logdir, COST, resume_step)
            self.elapsed = cost / max(self.price * self.world, 1e-12) * 3600 if cost else 0.0
        # purge_step: TensorBoard discards events at or past it from before the restart
        # (tensorboard/backend/event_processing/event_accumulator.py, _MaybePurgeOrphanedData)
        self.writer = SummaryWriter(str(logdir), purge_step=None if resume_step is None else resume_step + 1,
                                    flush_secs=30)

    @property
    def on(self) -> bool:
        return self.writer is not None

    def _reset_window(self) -> None:
        self.images = self.pairs = self.tokens = 0

    # ------------------------------------------------------------------ hooks
    def start(self, cfg, summary, step: int) -> None:
        self._t_step = time.perf_counter()
        if not self.on:
            return
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        self.writer.add_text(CONFIG_TEXT, "    " + text.replace("\n", "\n    "), step)  # markdown code block
        self.writer.add_text(DATA_TEXT, summary.text(), step)

    def micro(self, batch, pad_id: int) -> None:
        """After each micro-batch's forward/backward (batch None = an empty one)."""
        if not self.on or batch is None:
            return
        images, tokens = batch[0], batch[1]
        self.images += int(images.shape[0])
        self.pairs += int(tokens.shape[0])
        self.tokens += int((tokens[:, 1:] != pad_id).sum())  # predicted tokens (targets), CPU tensor

    def step(self, step: int, loss: float, lr: float, gnorm: float | None) -> None:
        now = time.perf_counter()
        dt, self._t_step = max(now - self._t_step, 1e-9), now
        self.elapsed += dt
        if not self.on:
            return
        w = self.writer
        w.add_scalar(LOSS, loss, step)
        w.add_scalar(LR, lr, step)
        if gnorm is not None and np.isfinite(gnorm):
            w.add_scalar(GRAD_NORM, gnorm, step)
        # every rank runs the same number of micro-batches of the same size: total = per GPU x ranks
        w.add_scalar(IMAGES_S_GPU, self.images / dt, step)
        w.add_scalar(PAIRS_S_GPU, self.pairs / dt, step)
        w.add_scalar(IMAGES_S, self.images / dt * self.world, step)
        w.add_scalar(PAIRS_S, self.pairs / dt * self.world, step)
        w.add_scalar(TOKENS_S, self.tokens / dt * self.world, step)
        w.add_scalar(COST, self.cost_so_far(), step)
        if self.device.type == "cuda":
            w.add_scalar(CUDA_MAX_MEM, torch.cuda.max_memory_allocated(self.device) / 2**30, step)
        self._reset_window()

    def cost_so_far(self) -> float:
        return self.elapsed / 3600 * self.world * self.price

    def validation(self, r, metrics: dict, hyps: dict) -> None:
        """After validation: val loss (teacher forcing, the training loss's definition), every
        caption metric, and the fixed held-out samples."""
        if not self.on:
            return
        t0 = time.perf_counter()
        step, w = r.state.step, self.writer
        w.add_scalar(VAL_LOSS, val_loss(r), step)
        for k, v in metrics.items():
            w.add_scalar(VAL_PREFIX + k, float(v), step)
        by_id = {rec.image_id: rec for rec in r.val_recs}
        if not self.sample_ids:  # the same images at every validation (val records are fixed per run)
            self.sample_ids = sorted(i for i in hyps if i in by_id)[:N_SAMPLES]
        for i in self.sample_ids:
            rec = by_id[i]
            w.add_image(f"samples/{i}", _thumbnail(rec.path), step, dataformats="HWC")
            refs = "\n".join(f"- {c}" for c in rec.captions)
            w.add_text(f"samples/{i}", f"**generated:** {hyps.get(i, '')}\n\n**references:**\n\n{refs}", step)
        w.flush()
        self._t_step += time.perf_counter() - t0  # validation time is not training throughput

    def flush(self) -> None:
        """Before the run folder is mirrored to the model store (each checkpoint)."""
        if self.on:
            self.writer.flush()

    def close(self) -> None:
        if self.on:
            self.writer.close()


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of an event folder, {tag: [(step, value)]}, read with TensorBoard's
    own EventAccumulator (which applies the purges of resumed runs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # only to read a run back

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def last_value(logdir: str | Path, tag: str, max_step: int) -> float | None:
    if not Path(logdir).exists():
        return None
    series = [v for s, v in read_scalars(logdir).get(tag, []) if s <= max_step]
    return series[-1] if series else None


def _thumbnail(path: str, side: int = 128) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        return np.asarray(im)


@torch.no_grad()
def val_loss(r, batch_size: int = 32) -> float:
    """Mean teacher-forced loss over the validation images, as the training loss is computed."""
    ds = CaptionImageDataset(r.val_recs, r.tok, r.pre, r.cfg.model.max_len)
    model, dev = r.raw_model, r.di.device
    model.eval()
    total, n = 0.0, 0
    try:
        for i in range(0, len(ds), batch_size):
            b = collate_grouped([ds[j] for j in range(i, min(i + batch_size, len(ds)))], pad_id=r.tok.pad_id)
            if b is None:
                continue
            images, tokens, index, _ = b
            with r.autocast():
                _, loss = model(images.to(dev), tokens.to(dev), index.to(dev),
                                label_smoothing=r.cfg.train.label_smoothing)
            total, n = total + float(loss) * tokens.shape[0], n + tokens.shape[0]
    finally:
        model.train()
    return total / max(n, 1)
