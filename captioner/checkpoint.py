"""Self-describing checkpoints: config, tokenizer, preprocessing, step and weights in one
file, written atomically (temp file + rename), read back by one loader."""
from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from captioner.config import ExperimentConfig, config_from_dict
from captioner.errors import NotACheckpointError
from captioner.model import Captioner
from captioner.preprocess import PreprocessConfig
from captioner.storage import atomic_write
from captioner.tokenizer import CaptionTokenizer

LATEST, BEST = "ckpt_latest.pt", "ckpt_best.pt"


def atomic_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    def copy(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 20)
    atomic_write(dst, copy)


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
    hint = "give a ckpt_best.pt / ckpt_latest.pt written by `captioner train`, or its run folder"
    if not zipfile.is_zipfile(p):  # torch.save writes a zip archive; anything else is not ours
        raise NotACheckpointError(f"{p} is not a captioner checkpoint (not a file written by torch.save)", hint)
    try:
        raw = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign archive
        raise NotACheckpointError(f"{p} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})",
                                  hint) from e
    for k in ("config", "model", "tokenizer", "preprocess", "step"):
        if not isinstance(raw, dict) or k not in raw:
            raise NotACheckpointError(f"{p} is not a captioner checkpoint (missing '{k}')", hint)
    cfg = config_from_dict(raw["config"])
    mcfg = cfg.model
    mcfg.pretrained, mcfg.encoder_weights = False, ""  # the checkpoint holds the weights
    model = Captioner(mcfg)
    model.load_state_dict(raw["model"])
    model.eval()
    return LoadedCheckpoint(model, CaptionTokenizer.from_str(raw["tokenizer"]),
                            PreprocessConfig.from_dict(raw["preprocess"]), cfg, int(raw["step"]), p, raw)
