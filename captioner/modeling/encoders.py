"""Checks that a timm encoder can be built before any work starts: the name exists, and the
pretrained weights it asks for are in a local cache or the Hub answers (one request with a
short timeout instead of the Hub client's minute of retries)."""
from __future__ import annotations

import difflib
import functools
import os
import urllib.error
import urllib.request
from pathlib import Path

from captioner.core.errors import UserError, WeightsUnavailableError

WEIGHTS_HINT = ("make the Hugging Face Hub reachable (or point HF_HUB_CACHE at a cache that holds the weights), "
                "or download the weights file elsewhere and pass --model.encoder_weights=/path/to/model.safetensors, "
                "or train from scratch with --model.pretrained=false")
# the files timm's load_state_dict_from_hf looks for (timm/models/_hub.py)
HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class UnknownEncoderError(UserError, ValueError):
    pass


def check_encoder(name: str, pretrained: bool, weights_file: str = "") -> None:
    """Raise a UserError naming the problem; return when timm can build the encoder."""
    import timm  # slow to import (and loads torch): only when an encoder is checked

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        raise UnknownEncoderError(f"unknown timm encoder '{name}' (model.encoder)",
                                  hint=(f"did you mean {', '.join(close)}? " if close else "")
                                  + "list the names with: python -c \"import timm; print(timm.list_models('vit_*'))\"")
    if weights_file:
        if not Path(weights_file).is_file():
            raise WeightsUnavailableError(f"--model.encoder_weights={weights_file}: no such file", hint=WEIGHTS_HINT)
        return
    if pretrained:
        _check_pretrained(name)


@functools.lru_cache(maxsize=None)
def _check_pretrained(name: str, timeout: float = 5.0) -> None:
    import torch  # as in check_encoder: torch, timm and the hub client load only for a pretrained check
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsUnavailableError(f"timm has no pretrained weights for encoder '{name}'",
                                      hint="set --model.pretrained=false or pick an encoder with weights")
    if cfg.file:
        if Path(cfg.file).is_file():
            return
        raise WeightsUnavailableError(f"pretrained weights file {cfg.file} for '{name}' does not exist", WEIGHTS_HINT)
    if cfg.hf_hub_id:
        repo, _, rev = cfg.hf_hub_id.partition("@")
        if any(isinstance(try_to_load_from_cache(repo, f, revision=rev or None), str) for f in HUB_FILES):
            return
        where = f"{constants.ENDPOINT}/{repo}"
        if constants.HF_HUB_OFFLINE:
            raise WeightsUnavailableError(f"pretrained weights for '{name}' ({repo}) are not in the Hugging Face "
                                          f"cache and HF_HUB_OFFLINE is set", WEIGHTS_HINT)
        url = f"{constants.ENDPOINT}/api/models/{repo}"
    else:
        if (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)).is_file():
            return
        where = url = cfg.url
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise WeightsUnavailableError(f"pretrained weights for '{name}' not found at {where} (HTTP 404)",
                                          WEIGHTS_HINT) from e
        # any other answer: the server is there; let timm fetch and report
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise WeightsUnavailableError(f"pretrained weights for '{name}' are not cached and {where} cannot be "
                                      f"reached ({reason})", WEIGHTS_HINT) from e
