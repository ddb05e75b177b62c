"""The checkpoint format, owned here: what a checkpoint holds, how it is written (atomic:
temp file + rename, mirrored to the model store) and how it is read back.

A checkpoint is a dict of tensors and primitives only (RNG states included), so it loads
with `torch.load(weights_only=True)`: a file that needs pickle to load (a crafted object
whose `__reduce__` runs code) is refused before anything in it runs. Training resumes
from `TrainState` + the optimizer/scheduler states; inference needs only the model,
tokenizer, preprocessing and config.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner.core.config import ExperimentConfig, config_from_dict
from captioner.core.deployment import CKPT_BEST, CKPT_LATEST
from captioner.core.errors import NotACheckpointError
from captioner.core.preprocess import PreprocessConfig
from captioner.core.tokenizer import CaptionTokenizer
from captioner.io.storage import atomic_write, open_store, publish
from captioner.modeling.model import Captioner

log = logging.getLogger(__name__)
LATEST, BEST = CKPT_LATEST, CKPT_BEST
FORMAT = 2  # 2: no pickled objects (RNG states as tensors/lists)
RUN_LOGS = ("metrics.jsonl", "val_metrics.jsonl")  # travel with the checkpoint to the store
RUN_LOG_DIRS = ("tb",)  # so do these folders' files (TensorBoard events, captioner/training/board.py)
# The store's list of those files: the trainer's MinIO user may read and write objects under
# models/runs/ but not list them (k8s/base/minio.yaml), so a restarted pod finds them here.
LOG_INDEX = "run_log_files.json"


class CheckpointError(NotACheckpointError):
    """A file that is not a loadable captioner checkpoint; the message names it."""

    def __init__(self, message: str,
                 hint: str = "give a ckpt_best.pt / ckpt_latest.pt written by `captioner train`, or its run folder"):
        super().__init__(message, hint)


# ------------------------------------------------------------------ RNG state as tensors
def rng_state() -> dict:
    """This process's RNG states (torch, numpy, python, cuda) as tensors and primitives."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pstate, pgauss = random.getstate()
    s = {"torch": torch.get_rng_state(),
         "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)},
         "python": {"version": int(version), "state": list(pstate), "gauss": pgauss}}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# ------------------------------------------------------------------ the training state
@dataclass
class TrainState:
    """Where training stands: enough to continue the exact same run."""
    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best: dict = field(default_factory=lambda: {"metric": "CIDEr", "value": -float("inf"), "step": 0})
    rng: list = field(default_factory=list)  # one rng_state() per rank
    run_id: str = ""  # the run this checkpoint belongs to (a KFP pipeline job id, or empty)
    data_position: dict = field(default_factory=dict)  # the epoch position in sample space (train.EpochLoader.position)


def checkpoint_dict(cfg: ExperimentConfig, model: torch.nn.Module, optimizer, scheduler, state: TrainState,
                    tokenizer: CaptionTokenizer, preprocess: PreprocessConfig, world_size: int) -> dict:
    """The one place a checkpoint's contents are assembled."""
    return {"format": FORMAT, "config": cfg.to_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **asdict(state),
            "tokenizer": tokenizer.to_str(), "preprocess": preprocess.to_dict(), "world_size": world_size}


def train_state(raw: dict) -> TrainState:
    return TrainState(step=int(raw["step"]), epoch=int(raw["epoch"]), micro_in_epoch=int(raw["micro_in_epoch"]),
                      best=dict(raw["best"]), rng=list(raw["rng"]), run_id=str(raw.get("run_id", "")),
                      data_position=dict(raw.get("data_position") or {}))


def _load_reason(e: Exception) -> str:
    """Why torch.load refused a file, without its advice to load it with weights_only=False
    (which would run whatever code the file holds)."""
    text = str(e).strip()
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if m:
        return m.group(1).strip().split(". ")[0][:200]
    first = text.splitlines()[0] if text else type(e).__name__
    return re.split(r"\s*Re-running `torch.load`", first)[0][:200]


def load_raw(path: str | Path, map_location: str = "cpu") -> dict:
    """torch.load with weights_only=True; anything else is refused with one line naming the file."""
    p = Path(path)
    if p.is_file() and not zipfile.is_zipfile(p):  # torch.save writes a zip archive; a CSV, image... is not one
        raise CheckpointError(f"{p}: not a captioner checkpoint (not a file written by torch.save)")
    try:
        raw = torch.load(p, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError (not a zip), EOFError...
        raise CheckpointError(f"{p}: refused: not a captioner checkpoint that loads without pickle "
                              f"(weights_only=True): {_load_reason(e)}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{p}: not a captioner checkpoint (holds a {type(raw).__name__}, not a dict)")
    for k in ("config", "model", "tokenizer", "preprocess", "step"):
        if k not in raw:
            raise CheckpointError(f"{p}: not a captioner checkpoint (missing '{k}')")
    return raw


def atomic_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    def copy(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 20)
    atomic_write(dst, copy)


def _download(store, key: str, path: Path) -> None:
    def copy(f):
        with store.open(key) as src:
            shutil.copyfileobj(src, f, 1 << 20)
    atomic_write(path, copy)  # ranks sharing a node may fetch the same file at once


class CheckpointSaver:
    """Owns a run's checkpoint files: `ckpt_latest.pt` (atomic), `ckpt_best.pt`, and their
    mirror in the model store (`store_uri`: a folder or s3:// prefix) so that a restarted
    pod or a retried step continues from the store with one call, `restore()`."""

    def __init__(self, out_dir: str | Path, store_uri: str = "", main: bool = True):
        self.out, self.store_uri, self.main = Path(out_dir), store_uri, main

    def _store(self, create: bool = False):
        return open_store(self.store_uri, create=create)

    def existing(self) -> str | None:
        """Where a previous run's checkpoint is (a local path or the store URI), else None."""
        if (self.out / LATEST).exists():
            return str(self.out / LATEST)
        if self.store_uri and self._store().exists(LATEST):
            return f"{self.store_uri.rstrip('/')}/{LATEST}"
        return None

    def restore(self) -> dict | None:
        """The latest checkpoint (local first, else downloaded from the store with the run's
        logs), loaded safely; None when there is none."""
        p = self.out / LATEST
        if not p.exists() and self.store_uri:
            store = self._store()
            if store.exists(LATEST):
                if self.main:
                    for name in (LATEST, BEST, *RUN_LOGS):
                        if store.exists(name):
                            _download(store, name, self.out / name)
                    for key in self._stored_log_dir_files(store):
                        _download(store, key, self.out / key)
                    log.info("fetched %s from the model store %s", LATEST, self.store_uri)
                else:  # other ranks read their own copy (no shared filesystem between nodes)
                    _download(store, LATEST, p)
        return load_raw(p) if p.exists() else None

    def clear(self) -> None:
        """--overwrite: forget the previous run here and in the store."""
        if not self.main:
            return
        for name in (LATEST, BEST, *RUN_LOGS):
            (self.out / name).unlink(missing_ok=True)
        for d in RUN_LOG_DIRS:
            shutil.rmtree(self.out / d, ignore_errors=True)
        if self.store_uri:
            store = self._store()
            for name in (LATEST, BEST, *RUN_LOGS):
                if store.exists(name):
                    store.delete(name)
            for key in self._stored_log_dir_files(store):
                store.delete(key)
            if store.exists(LOG_INDEX):
                store.delete(LOG_INDEX)

    @staticmethod
    def _stored_log_dir_files(store) -> list[str]:
        return json.loads(store.get_bytes(LOG_INDEX)) if store.exists(LOG_INDEX) else []

    def save(self, ckpt: dict, is_best: bool = False) -> None:
        if not self.main:
            return
        atomic_save(ckpt, self.out / LATEST)
        if is_best:
            atomic_copy(self.out / LATEST, self.out / BEST)
        log.info("checkpoint saved: %s (step %d)%s", self.out / LATEST, ckpt["step"], " (new best)" if is_best else "")
        if self.store_uri:
            store = self._store(create=True)
            for name in (LATEST, *((BEST,) if is_best else ()), *RUN_LOGS):
                if (self.out / name).exists():
                    store.put_file(name, self.out / name)
            keys = set(self._stored_log_dir_files(store))  # a resumed run's earlier files stay listed
            for d in RUN_LOG_DIRS:
                for f in sorted((self.out / d).rglob("*")) if (self.out / d).is_dir() else ():
                    if f.is_file():
                        store.put_file(f.relative_to(self.out).as_posix(), f)
                        keys.add(f.relative_to(self.out).as_posix())
            store.put_bytes(LOG_INDEX, json.dumps(sorted(keys)).encode())

    def finish(self) -> None:
        """No validation ran: the last checkpoint is also the best; publish the whole run."""
        if not self.main:
            return
        if not (self.out / BEST).exists() and (self.out / LATEST).exists():
            atomic_copy(self.out / LATEST, self.out / BEST)
        if self.store_uri:
            publish(self.out, self.store_uri)
            log.info("published %s to %s", self.out, self.store_uri)


# ------------------------------------------------------------------ inference loading
def resolve_checkpoint_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in (BEST, LATEST):
            if (p / name).exists():
                return p / name
        raise FileNotFoundError(f"no {BEST} or {LATEST} in {p}")
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    return p


@dataclass
class LoadedCheckpoint:
    model: Captioner
    tokenizer: CaptionTokenizer
    preprocess: PreprocessConfig
    config: ExperimentConfig
    step: int
    path: Path
    raw: dict


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> LoadedCheckpoint:
    p = resolve_checkpoint_path(path)
    raw = load_raw(p, map_location)
    cfg = config_from_dict(raw["config"])
    mcfg = cfg.model
    mcfg.pretrained, mcfg.encoder_weights = False, ""  # the checkpoint holds the weights
    model = Captioner(mcfg)
    model.load_state_dict(raw["model"])
    model.eval()
    return LoadedCheckpoint(model, CaptionTokenizer.from_str(raw["tokenizer"]),
                            PreprocessConfig.from_dict(raw["preprocess"]), cfg, int(raw["step"]), p, raw)
