"""COCO caption metrics through `pycocoevalcap`: BLEU-1..4, METEOR (needs Java), ROUGE-L and
CIDEr-D (pycocoevalcap's `Cider` is the CIDEr-D variant used on the COCO leaderboard)."""
from __future__ import annotations

import logging
import re
import shutil

log = logging.getLogger(__name__)


def have_java() -> bool:
    return shutil.which("java") is not None


def _simple_tokenize(caps: dict) -> dict:
    return {k: [" ".join(re.findall(r"[a-z0-9]+", c.lower())) for c in v] for k, v in caps.items()}


def tokenize(caps: dict[str, list[str]]) -> dict[str, list[str]]:
    """The PTB tokenizer (Stanford CoreNLP, via Java) when Java exists, else a plain one."""
    if have_java():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in caps.items()})
    return _simple_tokenize(caps)


def caption_metrics(refs: dict[str, list[str]], hyps: dict[str, str], meteor: bool = True) -> dict[str, float]:
    """refs: image id -> reference captions; hyps: image id -> generated caption."""
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

            out["METEOR"] = float(Meteor().compute_score(gts, res)[0])
        except Exception as e:  # noqa: BLE001 - METEOR is optional, never fatal
            log.warning("METEOR skipped: %s", e)
    elif meteor:
        log.info("METEOR skipped: no Java on PATH")
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out
