"""COCO caption metrics through `pycocoevalcap`: BLEU-1..4, METEOR (needs Java), ROUGE-L and
CIDEr-D (pycocoevalcap's `Cider` is the CIDEr-D variant used on the COCO leaderboard)."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile

log = logging.getLogger(__name__)


def have_java() -> bool:
    return shutil.which("java") is not None


def _simple_tokenize(caps: dict) -> dict:
    return {k: [" ".join(re.findall(r"[a-z0-9]+", c.lower())) for c in v] for k, v in caps.items()}


@contextlib.contextmanager
def _stderr_to_log(what: str):
    """pycocoevalcap's Java tools write progress chatter ("PTBTokenizer tokenized 8110 tokens at ...")
    straight to file descriptor 2: catch it and log it at DEBUG (shown with -v)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                log.debug("%s: %s", what, text)


def tokenize(caps: dict[str, list[str]]) -> dict[str, list[str]]:
    """The PTB tokenizer (Stanford CoreNLP, via Java) when Java exists, else a plain one."""
    if have_java():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        with _stderr_to_log("PTBTokenizer"):
            return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in caps.items()})
    return _simple_tokenize(caps)


def caption_metrics(refs: dict[str, list[str]], hyps: dict[str, str], meteor: bool = True) -> dict[str, float]:
    """refs: image id -> reference captions; hyps: image id -> generated caption."""
    return score_captions(refs, hyps, meteor)[0]


def score_captions(refs: dict[str, list[str]], hyps: dict[str, str],
                   meteor: bool = True) -> tuple[dict[str, float], dict[str, float]]:
    """-> (corpus metrics, per-image CIDEr-D). The per-image values use the corpus's document
    frequencies, so their mean is the corpus CIDEr-D."""
    # pycocoevalcap (the train extra) loads only when captions are scored
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not hyps:
        raise ValueError("no generated captions to score")
    missing = set(hyps) - set(refs)
    if missing:
        raise ValueError(f"generated captions for images without references: {sorted(missing)[:5]}")
    gts = tokenize({k: refs[k] for k in hyps})
    res = tokenize({k: [hyps[k] or "<empty>"] for k in hyps})
    out: dict[str, float] = {}
    b, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"BLEU-{i + 1}": float(x) for i, x in enumerate(b)})
    if meteor and have_java():
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            with _stderr_to_log("METEOR"):
                out["METEOR"] = float(Meteor().compute_score(gts, res)[0])
        except Exception as e:  # noqa: BLE001 - METEOR is optional, never fatal
            log.warning("METEOR skipped: %s", e)
    elif meteor:
        log.info("METEOR skipped: no Java on PATH")
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    cider, per_image = Cider().compute_score(gts, res)
    out["CIDEr"] = float(cider)
    return out, {k: float(v) for k, v in zip(gts.keys(), per_image)}
