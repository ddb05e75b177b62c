"""Training: one process or many under torchrun (DDP: gloo on CPU, NCCL on GPU), same code.

Each image is encoded once per batch for all of its captions. The shape follows timm's
train.py: `setup` builds everything, `EpochLoader` hides folder vs shard sources,
`train_one_epoch` and `validate` do the work, and `CheckpointSaver`
(captioner/modeling/checkpoint.py) owns the checkpoint format. Checkpoints carry optimizer,
scheduler, per-rank RNG and data position, so `--resume` continues the exact same run
(same data order, same losses), from the model store (`train.publish_uri`) when the local
folder is gone (a restarted pod).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from captioner.core.config import ExperimentConfig, save_config
from captioner.core.decoding import DecodeParams
from captioner.core.errors import DataNotFoundError, UserError
from captioner.core.preprocess import PreprocessConfig
from captioner.core.tokenizer import CaptionTokenizer
from captioner.data.datasets import CaptionImageDataset, ResumableBatchSampler, collate_grouped
from captioner.data.manifest import is_shard_source, materialize, open_shard_source, shard_store
from captioner.data.shards import ShardStream
from captioner.data.sources import (
    LAYOUTS,
    DataSummary,
    ImageRecord,
    assign_splits,
    by_split,
    read_records,
    summarize,
    verify_images,
)
from captioner.io.storage import is_s3
from captioner.modeling.checkpoint import (
    CheckpointSaver,
    TrainState,
    checkpoint_dict,
    rng_state,
    set_rng_state,
    train_state,
)
from captioner.modeling.model import Captioner, count_params
from captioner.training.board import TrainBoard, grad_norm
from captioner.training.evaluate import score_records

log = logging.getLogger(__name__)
# one line per rank at start and end, whatever the rank's log level (the CLI quiets ranks > 0)
rank_log = logging.getLogger(__name__ + ".ranks")
rank_log.setLevel(logging.INFO)


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


def _bcast(obj, di: DistInfo, group=None):
    if di.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _wait_group(cfg: ExperimentConfig, di: DistInfo):
    """A gloo process group with a timeout long enough for validation, for the ranks that
    wait while rank 0 decodes the validation captions. The default group's timeout (NCCL's
    watchdog: 10 minutes) would abort a long validation; gloo runs on CPU next to NCCL.
    Budget: 30 minutes plus 2 s per image and beam (a CPU decodes a beam-3 caption in ~1 s)."""
    if di.world == 1:
        return None
    t = cfg.train
    secs = 1800 + 2 * max(0, t.val_max_images) * max(1, t.val_beam_size)
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=secs))


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
    _adopt_dataset_split(cfg, manifest, di)
    train_caps = [ImageRecord(it.image_id, "", list(it.captions), "train") for it in manifest.items_in("train")]
    return train_caps, val, summary, manifest


SPLIT_KEYS = ("val_fraction", "test_fraction", "split_seed")


def _adopt_dataset_split(cfg: ExperimentConfig, manifest, di: DistInfo) -> None:
    """A dataset written by `captioner ingest` has its split fixed at ingest: the run's
    config records that split (not data.val_fraction & co, which are not used), with a notice
    when they differ."""
    opts = manifest.options or {}
    differ = [f"data.{k}={getattr(cfg.data, k)} (the dataset: {opts[k]})" for k in SPLIT_KEYS
              if k in opts and getattr(cfg.data, k) != opts[k]]
    if differ and di.main:
        log.warning("the dataset's split was fixed at ingest, so %s %s not used; the run's config.yaml records the "
                    "dataset's values (set the split with `captioner ingest --val-fraction/--test-fraction`)",
                    ", ".join(differ), "is" if len(differ) == 1 else "are")
    for k in SPLIT_KEYS:
        if k in opts:
            setattr(cfg.data, k, opts[k])


class RunExists(ValueError):
    """Training into a folder or model store that already holds a run, without --resume/--overwrite."""


class ResumeConfigError(UserError, ValueError):
    """--resume with settings that differ from the checkpoint's in a way the run cannot absorb."""


class TrainingInterrupted(UserError):
    """Ctrl-C during training; the message says where it stopped and how to continue."""
    exit_code = 130  # the shell's convention for a process ended by SIGINT


# Settings a resumed run may change: how long to train, how often to log, validate and save,
# where the data and outputs are, how it runs. Anything else (the model's shape, the
# optimizer, the data split) would make the checkpoint's state mean something else.
RESUMABLE_KEYS = frozenset({
    "train.epochs", "train.max_steps", "train.log_every", "train.ckpt_every", "train.val_max_images",
    "train.val_beam_size", "train.out_dir", "train.publish_uri", "train.run_id", "train.dist_backend",
    "train.compile", "train.precision", "train.api", "data.source", "data.image_root", "data.num_workers",
    "data.pin_memory", "data.shuffle_buffer",
    # set from the checkpoint's tokenizer and weights, whatever the command line says
    "model.vocab_size", "model.pad_id", "model.pretrained", "model.encoder_weights"})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("model", "data", "train"):
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(saved: dict, cfg: ExperimentConfig) -> list[str]:
    """`key saved -> now` for each setting of `cfg` that differs from a checkpoint's config
    and may not change on resume."""
    old, new = _flat(saved), _flat(cfg.to_dict())
    return [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in sorted(new)
            if k not in RESUMABLE_KEYS and k in old and old[k] != new[k]]


def _check_resume_config(ckpt: dict, cfg: ExperimentConfig, where: str) -> None:
    changed = config_changes(ckpt.get("config", {}), cfg)
    if is_shard_source(cfg.data.source):  # the dataset's own split is used, whatever these say
        changed = [c for c in changed if c.split()[0] not in {f"data.{k}" for k in SPLIT_KEYS}]
    if changed:
        allowed = ", ".join(sorted(k for k in RESUMABLE_KEYS if not k.startswith("model.")))
        raise ResumeConfigError(
            f"--resume: the checkpoint in {where} (step {ckpt['step']}) was trained with other settings: "
            + "; ".join(changed),
            hint=f"drop those overrides to continue the run (on resume only these may change: {allowed}), or start "
                 "a new run with another --train.out_dir or --overwrite")


def _resolve_local_source(cfg: ExperimentConfig, main: bool = True) -> None:
    """Fail before anything is written when the data source is missing, and store local paths
    absolute, so that the run (its config.yaml and checkpoints) is usable from any folder.
    Only rank 0 reads a local source (the others get it broadcast), so only it checks."""
    d = cfg.data
    if is_s3(d.source):
        return
    src = Path(d.source)
    if main and not src.exists():
        raise DataNotFoundError(f"data source not found: {d.source}",
                                hint=f"point --data.source at {LAYOUTS}; to try things out first, "
                                     f"`captioner generate-data {d.source}` writes generated images there")
    d.source = str(src.resolve())
    if d.image_root:
        d.image_root = str(Path(d.image_root).resolve())


class ResumeRefused(ValueError):
    """A mid-epoch checkpoint whose data position cannot be mapped onto this run's data."""


def _fingerprint(keys) -> str:
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode() + b"\0")
    return h.hexdigest()[:16]


class EpochLoader:
    """One epoch's micro-batches, whatever the source: a folder/JSON dataset with a resumable
    sampler, or tar shards streamed from the store. Always yields `micro_per_epoch` items
    (None = nothing to train on: all images of the batch bad, or this rank's share of the
    epoch is shorter), so every rank takes the same number of steps; `_micro_step` turns a
    None into a zero-weighted step through the DDP module.

    The epoch position is kept in sample space (`position`, stored in checkpoints as
    `data`): the folder path's consumption is always a prefix of the epoch's permutation
    (items consumed = start + micro x batch x world), the shard path's is the set of keys
    of the batches each (rank, worker) has yielded (`ShardStream.consumed`). `resume` maps a
    checkpoint's position onto this run: the same layout replays the exact batches; another
    world size, worker count or batch size continues the epoch with exactly the items not yet
    consumed (another batch composition, same items); a changed training split is refused."""

    def __init__(self, cfg: ExperimentConfig, di: DistInfo, train_recs, manifest, tok, pre):
        t, d, pin = cfg.train, cfg.data, cfg.data.pin_memory and di.device.type == "cuda"
        self.di, self.bs, self.seed, self.num_workers = di, t.batch_size, t.seed, d.num_workers
        self.epoch_seed = t.seed  # the seed of the epoch in progress (a resumed epoch keeps its own)
        self.pending: dict | None = None  # a resumed position, used by the first `batches` call
        self.skip: list = []  # shard keys consumed before the current plan of this epoch
        self.start = 0  # folder: items of the permutation consumed before the current plan
        self.taken: list[int] = []  # shard batches taken from each worker in this plan
        self.epoch = 0
        gen = torch.Generator().manual_seed(t.seed)  # keeps the global RNG untouched by workers
        if manifest is not None:  # stream tar shards from the store
            self.kind = "shards"
            self.store, self.manifest, self.tok, self.pre, self.max_len = (shard_store(cfg.data.source), manifest, tok,
                                                                          pre, cfg.model.max_len)
            self.ds = ShardStream(self.store, manifest, "train", tok, pre, cfg.model.max_len, t.batch_size, di.rank,
                                  di.world, t.seed, d.shuffle_buffer, d.num_workers, tagged=True)
            self.n = self.ds.n
            self.fingerprint = _fingerprint(f"{it.shard}/{it.key}" for it in manifest.items_in("train"))
            self.sampler = None
            # workers must see set_epoch, so they are not persistent
            self.loader = torch.utils.data.DataLoader(self.ds, batch_size=None, num_workers=d.num_workers,
                                                      pin_memory=pin, generator=gen)
            self._warn_read_amplification()
        else:
            self.kind = "folder"
            self.ds = CaptionImageDataset(train_recs, tok, pre, cfg.model.max_len)
            self.n = len(self.ds)
            self.fingerprint = _fingerprint(r.image_id for r in train_recs)
            self.sampler = ResumableBatchSampler(len(self.ds), t.batch_size, di.rank, di.world, seed=t.seed)
            self.loader = torch.utils.data.DataLoader(
                self.ds, batch_sampler=self.sampler, num_workers=d.num_workers, pin_memory=pin,
                collate_fn=functools.partial(collate_grouped, pad_id=tok.pad_id),
                persistent_workers=d.num_workers > 0, generator=gen)
        self.micro_per_epoch = self.micro_in(0)

    def micro_in(self, epoch: int) -> int:
        """Micro-batches per rank in a whole `epoch` (shards: depends on the epoch's shard order)."""
        if self.sampler is not None:
            return len(self.sampler)
        self.ds.set_epoch(epoch)
        return self.ds.batches_per_rank()

    def _warn_read_amplification(self) -> None:
        reads, shards = self.ds.read_amplification()
        if self.di.main and not self.ds.by_shard():
            data = sum(s.size for s in self.manifest.shards_in("train"))
            log.warning("data: %s (about %.1fx the data read per epoch)", self.ds.repack_hint(data),
                        reads / max(1, shards))

    # ---------------------------------------------------------------- sample-space position
    def position(self, micro: int, taken_by_rank: list | None = None) -> dict:
        """The checkpoint's record of where the epoch stands after `micro` micro-batches of
        the current plan (`taken_by_rank`: every rank's per-worker shard batch counts)."""
        d = self.ds.layout if self.kind == "shards" else None
        pos = {"kind": self.kind, "epoch": self.epoch, "items": self.n, "fingerprint": self.fingerprint,
               "world": self.di.world, "num_workers": self.num_workers, "batch_size": self.bs, "seed": self.epoch_seed,
               "micro": micro}
        if self.kind == "folder":
            pos["start"] = self.start
            pos["consumed"] = min(self.n, self.start + micro * self.bs * self.di.world)
        else:
            pos.update(shuffle_buffer=d.shuffle_buffer, partition=d.partition, skip=list(self.skip),
                       taken=taken_by_rank or [])
            old = self._stream_for(pos)
            pos["consumed"] = len(self.skip) + len(old.consumed(pos["taken"]))
        return pos

    def _stream_for(self, pos: dict) -> ShardStream:
        """A key-only ShardStream laid out as `pos` says (to recompute what it consumed)."""
        ds = ShardStream(self.store, self.manifest, "train", None, self.pre, self.max_len, pos["batch_size"], 0,
                         pos["world"], pos["seed"], pos["shuffle_buffer"], pos["num_workers"],
                         partition=pos["partition"])
        ds.set_epoch(pos["epoch"], pos["skip"])
        return ds

    def resume(self, pos: dict | None, epoch: int, micro: int, ckpt_world: int) -> int:
        """Continue from a checkpoint's data position; returns the micro-batch of `epoch` to
        start from (0 when the rest of the epoch is planned again). Raises ResumeRefused when
        the position cannot be mapped exactly onto this run."""
        if micro == 0:  # at an epoch boundary nothing depends on the old layout
            return 0
        if not pos:  # a checkpoint written before positions were recorded: only the same world size is exact
            if ckpt_world != self.di.world:
                raise ResumeRefused(f"the checkpoint stopped mid-epoch ({micro} micro-batches into epoch {epoch}) "
                                    f"with {ckpt_world} rank(s) and records no data position; this run has "
                                    f"{self.di.world}: resume it with {ckpt_world} rank(s), or from a checkpoint at an "
                                    "epoch boundary")
            if self.kind == "folder":
                self.pending = {"epoch": epoch, "start": 0, "seed": self.seed}
            return micro
        if pos["kind"] != self.kind or pos["items"] != self.n or pos["fingerprint"] != self.fingerprint:
            raise ResumeRefused(
                f"the checkpoint stopped mid-epoch on a different training split ({pos['kind']}: {pos['items']} items, "
                f"fingerprint {pos['fingerprint']}; now {self.kind}: {self.n} items, fingerprint {self.fingerprint}): "
                "which items are left cannot be told; resume with the data the checkpoint used")
        changed = [f"{k} {pos[k]} -> {v}" for k, v in (("world", self.di.world), ("num_workers", self.num_workers),
                                                       ("batch_size", self.bs)) if pos[k] != v]
        if self.kind == "folder":  # consumption is a prefix of the permutation: any layout continues it
            start = pos["start"] + pos["micro"] * pos["batch_size"] * pos["world"]
            self.pending = {"epoch": epoch, "start": start, "seed": pos["seed"]}
            first = 0
        else:
            same = not changed and pos["seed"] == self.seed and pos["shuffle_buffer"] == self.ds.buffer and \
                pos["partition"] == self.ds.partition
            if same:  # replay the same plan: the exact batches of an uninterrupted run
                self.pending = {"epoch": epoch, "skip": pos["skip"], "seed": pos["seed"]}
                first = micro
            else:
                consumed = set(pos["skip"]) | self._stream_for(pos).consumed(pos["taken"])
                self.pending = {"epoch": epoch, "skip": sorted(consumed), "seed": self.seed}
                first = 0
        if changed and self.di.main:
            log.warning("resuming epoch %d with another layout (%s): %d of %d items were consumed; the rest of "
                        "the epoch is planned again from the items left (same items, other batches)", epoch,
                        ", ".join(changed), self.n - self._left(), self.n)
        return first

    def _left(self) -> int:
        p = self.pending or {}
        return self.n - (len(p.get("skip", [])) if self.kind == "shards" else min(self.n, p.get("start", 0)))

    # ---------------------------------------------------------------- the epoch
    def _begin(self, epoch: int) -> None:
        p = self.pending if self.pending and self.pending["epoch"] == epoch else None
        self.pending, self.epoch = None, epoch
        self.epoch_seed = p["seed"] if p else self.seed
        if self.sampler is not None:
            self.start = p["start"] if p else 0
            self.sampler.seed = self.epoch_seed
        else:
            self.skip = list(p["skip"]) if p else []
            self.ds.seed = self.epoch_seed
            self.ds.set_epoch(epoch, self.skip)
            self.taken = [0] * max(1, self.num_workers)

    def batches(self, epoch: int, first: int):
        """This epoch's micro-batches from `first` (a replayed resume) to `micro_per_epoch`."""
        self._begin(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, first, self.start)
            self.micro_per_epoch = len(self.sampler)
            return self._folder_batches(first)
        self.micro_per_epoch = self.ds.batches_per_rank()
        return self._shard_batches(first)

    def _folder_batches(self, first: int):
        n = first
        for b in self.loader:
            n += 1
            yield b
        for _ in range(n, self.micro_per_epoch):
            yield None

    def _shard_batches(self, first: int):
        n = 0
        for wid, _, b in self.loader:  # resuming the same plan replays and drops the batches already taken
            self.taken[wid] += 1
            if n >= first:
                yield b
            n += 1
        for _ in range(max(n, first), self.micro_per_epoch):
            yield None


@dataclass
class Run:
    """Everything `setup` builds for one training run."""
    cfg: ExperimentConfig
    di: DistInfo
    out: Path
    tok: CaptionTokenizer
    pre: PreprocessConfig
    raw_model: Captioner
    model: torch.nn.Module  # raw_model wrapped in DDP / torch.compile
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    loader: EpochLoader
    val_recs: list
    total_steps: int
    state: TrainState
    saver: CheckpointSaver
    autocast: object
    pad_batch: tuple = ()  # the input of a padding step (`_micro_step`)
    wait_group: object = None  # validation waits here (`_wait_group`)
    losses: list = field(default_factory=list)
    position: tuple = (0, 0, [])  # (epoch, micro-batch, loader.taken) after the last optimizer step: where Ctrl-C saves
    board: TrainBoard | None = None  # TensorBoard events (rank 0)
    grad_norm: float | None = None  # of the last optimizer step, before clipping


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _previous_run(cfg: ExperimentConfig, di: DistInfo, saver: CheckpointSaver, resume: bool,
                  overwrite: bool) -> dict | None:
    """The checkpoint to continue from (None = start fresh). Refuses to replace a run unless
    asked to; refuses to continue another pipeline run's checkpoint."""
    t = cfg.train
    if overwrite:
        saver.clear()
        return None
    if not resume:
        where = _bcast(saver.existing() if di.main else None, di)
        if where:
            raise RunExists(f"{where} already holds a training run: pass --resume to continue it or --overwrite "
                            "to replace it (nothing was changed)")
        return None
    ckpt = saver.restore()
    if ckpt is None:
        if di.main:
            log.info("--resume: no checkpoint in %s%s yet: starting from scratch", t.out_dir,
                     f" or {t.publish_uri}" if t.publish_uri else "")
        return None
    theirs = str(ckpt.get("run_id", ""))
    if t.run_id and theirs and theirs != t.run_id:
        raise RunExists(f"the checkpoint in {t.publish_uri or t.out_dir} belongs to run {theirs!r}, not this run "
                        f"({t.run_id!r}): use a new model URI or --overwrite")
    _check_resume_config(ckpt, cfg, t.publish_uri or t.out_dir)
    if di.main:
        log.info("resuming from %s (step %d)", t.publish_uri or t.out_dir, ckpt["step"])
    return ckpt


def _check_same_start(ckpt: dict | None, di: DistInfo) -> None:
    """Every rank must continue from the same step as rank 0 (each node reads its own copy)."""
    mine = -1 if ckpt is None else int(ckpt["step"])
    theirs = _bcast(mine, di)
    if mine != theirs:
        raise RuntimeError(f"rank {di.rank} would start at step {mine} but rank 0 at step {theirs}: nodes "
                           "without a shared filesystem need the model store (--train.publish_uri) to resume")


def setup(cfg: ExperimentConfig, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Run:
    t = cfg.train
    di = init_distributed(t.dist_backend)
    rank_log.info("rank %d/%d joined (local rank %d, %s)", di.rank, di.world, di.local_rank, di.device)
    _resolve_local_source(cfg, di.main)
    out = Path(t.out_dir)
    out.mkdir(parents=True, exist_ok=True)  # every rank: each node has its own filesystem
    _seed(t.seed)
    saver = CheckpointSaver(out, t.publish_uri, di.main)
    ckpt = _previous_run(cfg, di, saver, resume, overwrite)
    _check_same_start(ckpt, di)

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
    cfg.model.vocab_size, cfg.model.pad_id = tok.vocab_size, tok.pad_id

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
    loader = EpochLoader(cfg, di, train_recs, manifest, tok, pre)
    total_steps = t.max_steps or sum(math.ceil(loader.micro_in(e) / t.grad_accum_steps) for e in range(t.epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, t.warmup_steps, t.min_lr_ratio))

    state = TrainState(best={"metric": t.best_metric, "value": -math.inf, "step": 0}, run_id=t.run_id)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state = train_state(ckpt)
        state.run_id = t.run_id or state.run_id
        state.micro_in_epoch = _resume_data(loader, state, int(ckpt.get("world_size", di.world)))
        set_rng_state(state.rng[di.rank] if di.rank < len(state.rng) else state.rng[0])
        if di.main:
            _truncate_jsonl(out / "metrics.jsonl", state.step)
            _truncate_jsonl(out / "val_metrics.jsonl", state.step)
    else:
        torch.manual_seed(t.seed + di.rank)  # different dropout masks per rank
        saver.clear()  # logs of an earlier, replaced run

    raw_model = model
    if di.world > 1:
        model = DDP(model, device_ids=[di.device.index] if di.device.type == "cuda" else None)
    if t.compile:
        model = torch.compile(model)
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and di.device.type == "cuda")
    autocast = (lambda: torch.autocast(di.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    board = TrainBoard(out, di.main, di.world, t.price_per_gpu_hour, state.step if ckpt is not None else None,
                       t.tensorboard, di.device)
    board.start(cfg, summary, state.step)
    return Run(cfg, di, out, tok, pre, raw_model, model, opt, sched, loader, val_recs, total_steps, state, saver,
               autocast, _pad_batch(tok, pre), _wait_group(cfg, di), board=board)


def _resume_data(loader: EpochLoader, state: TrainState, ckpt_world: int) -> int:
    """Where in its epoch a resumed run starts (see EpochLoader.resume). An elastic restart
    (a PyTorchJob between --min-nodes and --max-nodes, torchrun --nnodes MIN:MAX) comes back
    with another world size and `--resume`: it continues the epoch with the items not yet
    consumed; the learning-rate schedule keeps its step count."""
    return loader.resume(state.data_position, state.epoch, state.micro_in_epoch, ckpt_world)


def _pad_batch(tok: CaptionTokenizer, pre: PreprocessConfig) -> tuple:
    """One black image with the caption [BOS, EOS]: a real input for padding steps (its loss
    is finite, so loss x 0 gives exact zero gradients)."""
    return (torch.zeros(1, *pre.input_size), torch.tensor([[tok.bos_id, tok.eos_id]]), torch.zeros(1, dtype=torch.long),
            ["<padding>"])


def save_checkpoint(r: Run, epoch: int, micro: int, is_best: bool = False) -> None:
    """Every rank contributes its RNG state; rank 0 writes (and mirrors to the store)."""
    r.state.epoch, r.state.micro_in_epoch = epoch, micro
    mine = (rng_state(), list(r.loader.taken))
    if r.di.world > 1:
        both = [None] * r.di.world
        dist.all_gather_object(both, mine)
    else:
        both = [mine]
    r.state.rng = [b[0] for b in both]
    if micro == 0:  # an epoch boundary: the next epoch starts from its beginning with any layout
        r.state.data_position = {}
    else:
        r.state.data_position = r.loader.position(micro, [b[1] for b in both])
    if r.di.main:
        r.board.flush()  # its events travel to the model store with the checkpoint
        r.saver.save(checkpoint_dict(r.cfg, r.raw_model, r.opt, r.sched, r.state, r.tok, r.pre, r.di.world), is_best)


def validate(r: Run) -> dict | None:
    """Caption metrics on the validation images (rank 0); updates r.state.best on every rank."""
    t, res = r.cfg.train, None
    if r.di.main and r.val_recs and t.val_max_images > 0:
        r.raw_model.eval()
        params = DecodeParams(strategy="beam" if t.val_beam_size > 1 else "greedy", beam_size=t.val_beam_size,
                              max_new_tokens=r.cfg.model.max_new_tokens)
        metrics, hyps, _ = score_records(r.raw_model, r.tok, r.pre, r.val_recs, params, r.di.device, meteor=False)
        r.raw_model.train()
        res = {"step": r.state.step, **metrics}
        with open(r.out / "val_metrics.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")
        log.info("val step %d: %s | e.g. %s: %r", r.state.step, " ".join(f"{k}={v:.3f}" for k, v in metrics.items()),
                 *next(iter(hyps.items())))
        r.board.validation(r, metrics, hyps)
        if metrics.get(t.best_metric, -math.inf) > r.state.best["value"]:
            r.state.best = {"metric": t.best_metric, "value": metrics[t.best_metric], "step": r.state.step}
    r.state.best = _bcast(r.state.best, r.di, r.wait_group)  # long timeout: see _wait_group
    return res


def _micro_step(r: Run, batch, sync_now: bool) -> tuple[float | None, int, int]:
    """Forward + backward of one micro-batch; returns (loss or None, pairs, images).

    A padding step (batch None: this rank's share of the epoch ran out, or every image of
    the batch failed to decode) runs a real input through the DDP module and multiplies its
    loss by 0. DDP all-reduces gradients only in a backward that follows a forward of the
    DDP module (torch/nn/parallel/distributed.py: `_pre_forward` calls
    `reducer.prepare_for_forward`, `_post_forward` `reducer.prepare_for_backward`), so this
    keeps every gradient bucket's all-reduce matched with the other ranks'; a backward
    through the raw model does not and desynchronises the ranks. The padding rank adds zeros
    and DDP still divides by the world size: a partly padded step is averaged as DDP's own
    `join(divide_by_initial_world_size=True)` does (`_DDPJoinHook.main_hook` →
    `_match_all_reduce_for_bwd_pass`). `Join` itself (torch/distributed/algorithms/join.py)
    is not used: a joined rank stops calling the optimizer, scheduler and our own
    collectives (loss all-reduce, checkpoint gather), so its AdamW state would drift and
    only the weights are synced back (`_sync_final_model`); padding steps keep every rank on
    every step."""
    di, t = r.di, r.cfg.train
    sync = nullcontext() if (sync_now or di.world == 1) else r.model.no_sync()
    real = batch is not None
    with sync:
        images, tokens, index, _ = batch if real else r.pad_batch
        images, tokens, index = (images.to(di.device, non_blocking=True), tokens.to(di.device, non_blocking=True),
                                 index.to(di.device))
        with r.autocast():
            _, loss = r.model(images, tokens, index, label_smoothing=t.label_smoothing)
        weight = 1.0 if real else 0.0
        (loss * weight / t.grad_accum_steps).backward()
    if not real:
        return None, 0, 0
    return float(loss.detach()), tokens.shape[0], images.shape[0]


def _optimizer_step(r: Run, loss_sum: float, n_loss: int) -> float:
    t, di = r.cfg.train, r.di
    if t.grad_clip > 0 or r.board.on:
        r.grad_norm = grad_norm(r.raw_model, t.grad_clip)
    r.opt.step()
    r.sched.step()
    r.opt.zero_grad(set_to_none=True)
    r.state.step += 1
    lt = torch.tensor([loss_sum, n_loss], dtype=torch.float64)
    if di.world > 1:  # the mean over the real micro-batches of all ranks (padding steps have no loss)
        dist.all_reduce(lt)
    return float(lt[0] / max(1.0, float(lt[1])))


def train_one_epoch(r: Run, epoch: int, first: int, bar) -> int:
    """Train from micro-batch `first` of `epoch` to its end (or the step budget); returns
    the micro-batch position reached."""
    t, di = r.cfg.train, r.di
    acc, n_loss, t0, pairs, images_seen = 0.0, 0, time.time(), 0, 0
    step_t0, step_pairs, step_images = time.time(), 0, 0
    micro = first
    for batch in r.loader.batches(epoch, first):
        last = (micro + 1) % t.grad_accum_steps == 0 or micro + 1 == r.loader.micro_per_epoch
        loss, p, n = _micro_step(r, batch, last)
        r.board.micro(batch, r.tok.pad_id)
        if loss is not None:
            acc, n_loss, pairs, images_seen = acc + loss, n_loss + 1, pairs + p, images_seen + n
            step_pairs, step_images = step_pairs + p, step_images + n
        micro += 1
        if not last:
            continue
        loss_v = _optimizer_step(r, acc, n_loss)
        acc, n_loss = 0.0, 0
        step = r.state.step
        r.position = (epoch, micro, list(getattr(r.loader, "taken", [])))
        r.losses.append((step, loss_v))
        if di.main:
            lr = r.sched.get_last_lr()[-1]
            now = time.time()
            _log_step(r.out, step, epoch, loss_v, lr, now, step_images * di.world / max(now - step_t0, 1e-9),
                      step_pairs * di.world / max(now - step_t0, 1e-9))
            step_t0, step_pairs, step_images = now, 0, 0
            r.board.step(step, loss_v, lr, r.grad_norm)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}", lr=f"{lr:.2e}")
            if t.log_every and step % t.log_every == 0:
                dt = time.time() - t0
                log.info("step %d/%d epoch %d loss %.4f lr %.2e | %.1f img/s %.1f pairs/s per rank", step,
                         r.total_steps, epoch, loss_v, lr, images_seen / dt, pairs / dt)
                t0, pairs, images_seen = time.time(), 0, 0
        if t.ckpt_every and step % t.ckpt_every == 0:
            save_checkpoint(r, epoch, micro)
        if step >= r.total_steps:
            break
    return micro


def _log_step(out: Path, step: int, epoch: int, loss: float, lr: float, now: float, images_per_s: float,
              pairs_per_s: float) -> None:
    """One line of metrics.jsonl: the step's loss and lr, when it ended (UTC) and the
    throughput of all ranks (rank 0's rate times the world size: ranks take equal batches)."""
    row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr,
           "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
           "images_per_s": round(images_per_s, 2), "pairs_per_s": round(pairs_per_s, 2)}
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _save_on_interrupt(r: Run) -> TrainingInterrupted:
    """Ctrl-C: keep the steps done so far (one process: a checkpoint at the last optimizer
    step; under torchrun the other ranks are stopping too, so the last checkpoint stands)."""
    step, (epoch, micro, taken) = r.state.step, r.position
    saved = ""
    if r.di.world == 1 and r.losses:  # a step was taken in this process (else the last checkpoint is current)
        if micro >= r.loader.micro_per_epoch:
            epoch, micro = epoch + 1, 0
        if hasattr(r.loader, "taken"):  # shard batches taken by the last finished step, not by the interrupted one
            r.loader.taken = taken
        save_checkpoint(r, epoch, micro)
        saved = f"; checkpoint saved in {r.out}"
    return TrainingInterrupted(f"training interrupted at step {step}/{r.total_steps}{saved}",
                               hint="rerun the same command with --resume to continue from the last checkpoint")


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class TrainResult:
    model: Captioner
    out_dir: Path
    step: int
    losses: list
    val_history: list
    best: dict


def train(cfg: ExperimentConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Train (or continue, with resume) one run; refuses to replace an existing run unless
    overwrite. Rank 0 writes the run folder and mirrors checkpoints to `train.publish_uri`."""
    try:
        r = setup(cfg, resume, overwrite, progress)
    except KeyboardInterrupt:
        raise TrainingInterrupted("training interrupted before the first step",
                                  hint="rerun the same command (add --resume if a checkpoint was written)") from None
    try:
        return _train_loop(r, progress)
    except KeyboardInterrupt:
        raise _save_on_interrupt(r) from None


def _train_loop(r: Run, progress: bool) -> TrainResult:
    cfg = r.cfg
    t, di, st = cfg.train, r.di, r.state
    r.position = (st.epoch, st.micro_in_epoch, list(getattr(r.loader, "taken", [])))
    val_history = []
    bar = tqdm(total=r.total_steps, initial=st.step, desc="train", unit="step", disable=not (progress and di.main),
               dynamic_ncols=True)
    r.model.train()
    epoch = st.epoch
    while st.step < r.total_steps and (t.max_steps or epoch < t.epochs):
        first = st.micro_in_epoch if epoch == st.epoch else 0
        micro = train_one_epoch(r, epoch, first, bar)
        end_of_epoch = micro >= r.loader.micro_per_epoch
        v = validate(r)
        if v:
            val_history.append(v)
        save_checkpoint(r, epoch + 1 if end_of_epoch else epoch, 0 if end_of_epoch else micro,
                        is_best=bool(v) and st.best["step"] == st.step)
        if not end_of_epoch:
            break
        epoch += 1
    bar.close()
    r.board.close()
    r.saver.finish()
    rank_log.info("rank %d/%d done at step %d; weights sha256 %s", di.rank, di.world, st.step,
                  weights_digest(r.raw_model))
    if di.world > 1:
        dist.barrier()
    return TrainResult(r.raw_model, r.out, st.step, r.losses, val_history, st.best)


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """On resume drop log lines of steps after the checkpoint (the killed run may have logged them)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= max_step]
    path.write_text("".join(ln + "\n" for ln in keep))
