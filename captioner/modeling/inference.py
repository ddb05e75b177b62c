"""PyTorch captioning: the KV-cached step function over a `Captioner` and batch helpers."""
from __future__ import annotations

import numpy as np
import torch

from captioner.core.decoding import CachedStep, DecodeParams, decode
from captioner.core.preprocess import ImageError, PreprocessConfig, preprocess_path
from captioner.core.tokenizer import CaptionTokenizer
from captioner.modeling.model import Captioner


def torch_step(model: Captioner, cross_kv: torch.Tensor) -> CachedStep:
    dev = cross_kv.device

    @torch.no_grad()
    def run(ids: np.ndarray, cross, past):
        logits, present = model.decode_step(torch.from_numpy(ids).to(dev), cross, past)
        return logits.float().cpu().numpy(), present

    return CachedStep(run, cross_kv, None, index=lambda a, rows: None if a is None else a[torch.as_tensor(rows, device=dev)])


@torch.no_grad()
def caption_tensor(model: Captioner, tok: CaptionTokenizer, images: torch.Tensor,
                   params: DecodeParams | None = None) -> list[str]:
    params = params or DecodeParams(max_new_tokens=model.cfg.max_new_tokens)
    params.max_new_tokens = min(params.max_new_tokens or model.cfg.max_new_tokens, model.cfg.max_new_tokens)
    _, cross = model.encode_for_decoding(images)
    ids = decode(torch_step(model, cross), images.shape[0], tok.bos_id, tok.eos_id, params)
    return [tok.decode(s) for s in ids]


def caption_arrays(model: Captioner, tok: CaptionTokenizer, pixels: np.ndarray, params: DecodeParams | None = None,
                   batch_size: int = 32, device: str | torch.device = "cpu") -> list[str]:
    model.eval()
    out: list[str] = []
    for i in range(0, len(pixels), batch_size):
        x = torch.from_numpy(pixels[i:i + batch_size]).to(device)
        p = DecodeParams(**vars(params)) if params else None
        out += caption_tensor(model, tok, x, p)
    return out


def caption_paths(model: Captioner, tok: CaptionTokenizer, pre: PreprocessConfig, paths: list,
                  params: DecodeParams | None = None, chunk: int = 64):
    """Caption image files in chunks (bounded memory for thousands of images): yields
    (path, caption, None), or (path, None, error) for a file that is not a usable image; the other
    files keep going. `pre`: the checkpoint's preprocessing."""
    for i in range(0, len(paths), chunk):
        good, arrays = [], []
        for p in paths[i:i + chunk]:
            try:
                arrays.append(preprocess_path(p, pre))
                good.append(p)
            except ImageError as e:
                yield p, None, str(e)
        if arrays:
            for p, c in zip(good, caption_arrays(model, tok, np.stack(arrays), params)):
                yield p, c, None
