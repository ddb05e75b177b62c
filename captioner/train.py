"""Training: one process or many under torchrun (DDP: gloo on CPU, NCCL on GPU), same code.

Each image is encoded once per batch for all of its captions. Checkpoints are atomic and
carry optimizer, scheduler, per-rank RNG and data position, so `--resume` continues the
exact same run (same data order, same losses).
"""
from __future__ import annotations

import json
import logging
import math
import os
import functools
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from captioner.checkpoint import BEST, LATEST, atomic_copy, atomic_save
from captioner.config import ExperimentConfig, save_config
from captioner.data import (CaptionImageDataset, DataSummary, ImageRecord, ResumableBatchSampler, assign_splits,
                            by_split, collate_grouped, read_records, summarize, verify_images)
from captioner.decoding import DecodeParams
from captioner.evaluate import score_records
from captioner.model import Captioner, count_params
from captioner.preprocess import PreprocessConfig
from captioner.shards import ShardStream, is_shard_source, materialize, open_shard_source, shard_store
from captioner.tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if backend == "auto" and cuda else "gloo" if backend == "auto" else backend)
    return DistInfo(rank, world, local, device)


def _bcast(obj, di: DistInfo):
    if di.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        prog = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))
    return f


def param_groups(model: Captioner, cfg: ExperimentConfig) -> list[dict]:
    t = cfg.train
    groups = {k: [] for k in ("enc_decay", "enc_no", "dec_decay", "dec_no")}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "enc" if n.startswith("encoder.backbone.") else "dec"
        groups[f"{part}_{'decay' if p.ndim >= 2 else 'no'}"].append(p)
    lr_enc = t.lr * t.encoder_lr_scale
    return [g for g in (
        {"params": groups["enc_decay"], "weight_decay": t.weight_decay, "lr": lr_enc},
        {"params": groups["enc_no"], "weight_decay": 0.0, "lr": lr_enc},
        {"params": groups["dec_decay"], "weight_decay": t.weight_decay, "lr": t.lr},
        {"params": groups["dec_no"], "weight_decay": 0.0, "lr": t.lr},
    ) if g["params"]]


def prepare_data(cfg: ExperimentConfig, di: DistInfo, progress: bool = True):
    """Rank 0 reads and verifies the data once; the result is broadcast to the other ranks.
    Returns (train records, val records, summary, manifest). For a shard source the train
    "records" carry captions only (images are streamed) and manifest is the dataset's;
    for a folder or JSON source manifest is None."""
    if is_shard_source(cfg.data.source):
        return _prepare_shards(cfg, di)
    payload = None
    if di.main:
        d = cfg.data
        recs, summary = read_records(d.source, d.format, d.image_root, max_images=d.max_images)
        recs = verify_images(recs, summary, PreprocessConfig().max_pixels, progress=progress)
        assign_splits(recs, d.val_fraction, d.test_fraction, d.split_seed)
        summarize(recs, summary)
        log.info("data: %s; per split: %s", summary.text(), summary.per_split)
        payload = (recs, summary)
    recs, summary = _bcast(payload, di)
    return by_split(recs, "train"), by_split(recs, "val")[: cfg.train.val_max_images], summary, None


def _prepare_shards(cfg: ExperimentConfig, di: DistInfo):
    payload = None
    if di.main:
        store, manifest = open_shard_source(cfg.data.source)
        summary = DataSummary(images=len(manifest.items),
                              captions=sum(len(it.captions) for it in manifest.items),
                              skipped={k: list(v) for k, v in manifest.skipped.items()})
        summary.per_split = {k: v.items for k, v in manifest.splits.items()}  # type: ignore[attr-defined]
        val = materialize(store, manifest, "val", Path(cfg.train.out_dir) / "val_cache", cfg.train.val_max_images) \
            if cfg.train.val_max_images > 0 else []
        log.info("data: shards at %s: %s; per split: %s", store.uri, summary.text(), summary.per_split)
        payload = (manifest, val, summary)
    manifest, val, summary = _bcast(payload, di)
    train_caps = [ImageRecord(it.image_id, "", list(it.captions), "train") for it in manifest.items_in("train")]
    return train_caps, val, summary, manifest


@dataclass
class TrainResult:
    model: Captioner
    out_dir: Path
    step: int
    losses: list
    val_history: list
    best: dict


def train(cfg: ExperimentConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    t = cfg.train
    di = init_distributed(t.dist_backend)
    out = Path(t.out_dir)
    if di.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    random.seed(t.seed)

    ckpt = None
    if resume:
        p = out / LATEST
        if p.exists():
            ckpt = torch.load(p, map_location="cpu", weights_only=False)
            log.info("resuming from %s (step %d)", p, ckpt["step"]) if di.main else None
        elif di.main:
            log.warning("--resume given but %s does not exist: starting from scratch", p)

    train_recs, val_recs, summary, manifest = prepare_data(cfg, di, progress)
    if not train_recs:
        raise ValueError(f"no training images left in {cfg.data.source} ({summary.text()})")

    if ckpt is not None:
        tok = CaptionTokenizer.from_str(ckpt["tokenizer"])
    else:
        tok_json = None
        if di.main:
            caps = [c for r in train_recs for c in r.captions]  # training captions only
            tok_json = CaptionTokenizer.train(caps, cfg.data.tokenizer, cfg.data.vocab_size,
                                              cfg.data.min_word_freq).to_str()
        tok = CaptionTokenizer.from_str(_bcast(tok_json, di))
    cfg.model.vocab_size = tok.vocab_size
    cfg.model.pad_id = tok.pad_id

    model = Captioner(cfg.model)
    pre = PreprocessConfig.from_model(model.encoder.backbone)
    model.to(di.device)
    if di.main:
        save_config(cfg, out / "config.yaml")
        tok.save(out / "tokenizer.json")
        (out / "data_summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
        log.info("model: %s encoder + %d-layer decoder, %.2fM params; vocab %d; input %s",
                 cfg.model.encoder, cfg.model.n_layers, count_params(model) / 1e6, tok.vocab_size, pre.input_size)

    opt = torch.optim.AdamW(param_groups(model, cfg), lr=t.lr, betas=tuple(t.betas))
    if manifest is not None:  # stream tar shards from the store
        ds = ShardStream(shard_store(cfg.data.source), manifest, "train", tok, pre, cfg.model.max_len, t.batch_size, di.rank, di.world,
                         t.seed, cfg.data.shuffle_buffer, cfg.data.num_workers)
        sampler = None
        micro_per_epoch = ds.batches_per_rank()
    else:
        ds = CaptionImageDataset(train_recs, tok, pre, cfg.model.max_len)
        sampler = ResumableBatchSampler(len(ds), t.batch_size, di.rank, di.world, seed=t.seed)
        micro_per_epoch = len(sampler)
    steps_per_epoch = math.ceil(micro_per_epoch / t.grad_accum_steps)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, t.warmup_steps, t.min_lr_ratio))

    step, start_epoch, start_micro = 0, 0, 0
    best = {"metric": t.best_metric, "value": -math.inf, "step": 0}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        step, start_epoch, start_micro = ckpt["step"], ckpt["epoch"], ckpt["micro_in_epoch"]
        best = ckpt.get("best", best)
        _set_rng_state(ckpt["rng"][di.rank] if di.rank < len(ckpt["rng"]) else ckpt["rng"][0])
        if di.main:
            _truncate_jsonl(out / "metrics.jsonl", step)
            _truncate_jsonl(out / "val_metrics.jsonl", step)
    else:
        torch.manual_seed(t.seed + di.rank)  # different dropout masks per rank
        if di.main and (out / LATEST).exists():
            log.warning("%s already holds a run: starting from scratch and replacing it (use --resume to "
                        "continue it)", out)
        if di.main:
            for name in ("metrics.jsonl", "val_metrics.jsonl", BEST):
                (out / name).unlink(missing_ok=True)

    raw_model = model
    if di.world > 1:
        model = DDP(model, device_ids=[di.device.index] if di.device.type == "cuda" else None)
    if t.compile:
        model = torch.compile(model)
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and di.device.type == "cuda")
    autocast = (lambda: torch.autocast(di.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    pin = cfg.data.pin_memory and di.device.type == "cuda"
    if sampler is not None:
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=sampler, num_workers=cfg.data.num_workers, pin_memory=pin,
            collate_fn=functools.partial(collate_grouped, pad_id=tok.pad_id),
            persistent_workers=cfg.data.num_workers > 0,
            generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG untouched by workers
        )
    else:  # workers must see set_epoch, so they are not persistent
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg.data.num_workers, pin_memory=pin,
                                             generator=torch.Generator().manual_seed(t.seed))

    def epoch_batches(epoch: int, first: int):
        """This epoch's micro-batches from `first` on; always `micro_per_epoch` of them
        (None = an empty batch: all images bad, or a stream shorter on this rank)."""
        if sampler is not None:
            sampler.set_epoch(epoch, first)
            n = first
            for b in loader:
                n += 1
                yield b
        else:
            ds.set_epoch(epoch)
            n = 0
            for b in loader:  # resuming a stream replays and drops the batches already seen
                if n >= first:
                    yield b
                n += 1
            n = max(n, first)
        for _ in range(n, micro_per_epoch):
            yield None

    def save(epoch: int, micro: int) -> None:
        rngs = [None] * di.world
        if di.world > 1:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        if di.main:
            atomic_save({"config": cfg.to_dict(), "model": raw_model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "step": step, "epoch": epoch, "micro_in_epoch": micro,
                         "rng": rngs, "tokenizer": tok.to_str(), "preprocess": pre.to_dict(), "best": best,
                         "world_size": di.world}, out / LATEST)
            log.info("checkpoint saved: %s (step %d)", out / LATEST, step)

    def validate() -> dict | None:
        nonlocal best
        res = None
        if di.main and val_recs and t.val_max_images > 0:
            raw_model.eval()
            params = DecodeParams(strategy="beam" if t.val_beam_size > 1 else "greedy", beam_size=t.val_beam_size,
                                  max_new_tokens=cfg.model.max_new_tokens)
            metrics, hyps, kept = score_records(raw_model, tok, pre, val_recs, params,
                                                di.device, meteor=False)
            raw_model.train()
            res = {"step": step, **metrics}
            with open(out / "val_metrics.jsonl", "a") as f:
                f.write(json.dumps(res) + "\n")
            sample = next(iter(hyps.items()))
            log.info("val step %d: %s | e.g. %s: %r", step,
                     " ".join(f"{k}={v:.3f}" for k, v in metrics.items()), *sample)
            if metrics.get(t.best_metric, -math.inf) > best["value"]:
                best = {"metric": t.best_metric, "value": metrics[t.best_metric], "step": step}
        best = _bcast(best, di)
        return res

    losses, val_history = [], []
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (progress and di.main),
               dynamic_ncols=True)
    model.train()
    acc_loss, n_micro, t0, pairs, images_seen = 0.0, 0, time.time(), 0, 0
    done = step >= total_steps
    for epoch in range(start_epoch, t.epochs if not t.max_steps else 10**9):
        if done:
            break
        first = start_micro if epoch == start_epoch else 0
        micro = first
        for batch in epoch_batches(epoch, first):
            last = (micro + 1) % t.grad_accum_steps == 0 or micro + 1 == micro_per_epoch
            sync = nullcontext() if (last or di.world == 1) else model.no_sync()
            with sync:
                if batch is None:  # every image of this micro-batch was unreadable
                    loss = sum(p.sum() * 0.0 for p in raw_model.parameters() if p.requires_grad)
                else:
                    images, tokens, index, _ = batch
                    images, tokens, index = (images.to(di.device, non_blocking=True),
                                             tokens.to(di.device, non_blocking=True), index.to(di.device))
                    with autocast():
                        _, loss = model(images, tokens, index, label_smoothing=t.label_smoothing)
                    pairs += tokens.shape[0]
                    images_seen += images.shape[0]
                (loss / t.grad_accum_steps).backward()
            if batch is not None:
                acc_loss += float(loss.detach())
                n_micro += 1
            micro += 1
            if not last:
                continue
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), t.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            lt = torch.tensor([acc_loss / max(1, n_micro)], dtype=torch.float64)
            if di.world > 1:
                dist.all_reduce(lt)
                lt /= di.world
            acc_loss, n_micro = 0.0, 0
            loss_v = float(lt)
            losses.append((step, loss_v))
            if di.main:
                lr = sched.get_last_lr()[-1]
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "epoch": epoch, "loss": loss_v, "lr": lr}) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{loss_v:.3f}", lr=f"{lr:.2e}")
                if t.log_every and step % t.log_every == 0:
                    dt = time.time() - t0
                    log.info("step %d/%d epoch %d loss %.4f lr %.2e | %.1f img/s %.1f pairs/s per rank", step,
                             total_steps, epoch, loss_v, lr, images_seen / dt, pairs / dt)
                    t0, pairs, images_seen = time.time(), 0, 0
            if t.ckpt_every and step % t.ckpt_every == 0:
                save(epoch, micro)
            if step >= total_steps:
                done = True
                break
        end_of_epoch = micro >= micro_per_epoch
        v = validate()
        if v:
            val_history.append(v)
        save(epoch + 1 if end_of_epoch else epoch, 0 if end_of_epoch else micro)
        if di.main and v and best["step"] == step:
            atomic_copy(out / LATEST, out / BEST)
            log.info("new best %s=%.4f at step %d -> %s", t.best_metric, best["value"], step, out / BEST)
    bar.close()
    if di.main and not (out / BEST).exists():
        atomic_copy(out / LATEST, out / BEST)
    if di.main and t.publish_uri:
        from captioner.storage import publish

        publish(out, t.publish_uri)
        log.info("published %s to %s", out, t.publish_uri)
    if di.world > 1:
        dist.barrier()
    return TrainResult(raw_model, out, step, losses, val_history, best)


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """On resume drop log lines of steps after the checkpoint (the killed run may have logged them)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= max_step]
    path.write_text("".join(ln + "\n" for ln in keep))
