"""`captioner export`: checkpoint -> complete Triton model repository (ONNX encoder and
decoder, Python-backend preprocess and decode loop, ensemble), with a parity check of
onnxruntime against PyTorch that fails loudly. The decode loop's version folder also gets the
decoder graph it runs in process (decoder.onnx) and select_rows.onnx.

This module assembles the repository and writes it beside `--out`, then swaps it into place
(captioner.io.files.replace_folder). The parts: torch_graphs (the ONNX graphs), optimize
(fusions, int8/int4), parity (onnxruntime against PyTorch)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import onnx

from captioner.core.config import save_config
from captioner.core.errors import UnsafeOutputError
from captioner.core.limits import MAX_BATCH
from captioner.core.names import DECODE_LOOP, DECODER, DECODER_GRAPH_FILE, ENCODER, ONNX_MODEL_FILE
from captioner.core.runs import CONFIG_FILE
from captioner.export.graphs import DTYPES, fused_operator_counts
from captioner.export.optimize import QUANTIZE, optimize_decoder_step, optimize_graphs, quantize_int4, quantize_int8
from captioner.export.parity import check_parity
from captioner.export.report import ExportReport
from captioner.export.repository import write_serving_files
from captioner.export.torch_graphs import export_onnx, write_decoder_step
from captioner.io.files import replace_folder, sibling_folder
from captioner.modeling.checkpoint import LoadedCheckpoint, load_checkpoint
from captioner.serving.triton_repo import ALL_MODELS, REPOSITORY_MARKER, check_repository, write_marker

log = logging.getLogger(__name__)


def _node_domains(graph) -> set[str]:
    out = set()
    for n in graph.node:
        out.add(n.domain or "ai.onnx")
        for a in n.attribute:  # If/Loop/Scan bodies
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out |= _node_domains(g)
    return out


def onnx_versions(repo: Path) -> dict:
    """IR version and the opsets each exported graph uses (the operator domains its nodes are
    in; an optimizer declares more than it uses): what the serving runtime must support."""
    out = {}
    graphs = {ENCODER: repo / ENCODER / "1" / ONNX_MODEL_FILE, DECODER: repo / DECODER / "1" / ONNX_MODEL_FILE,
              DECODE_LOOP: repo / DECODE_LOOP / "1" / DECODER_GRAPH_FILE}
    for name, path in graphs.items():
        if not path.exists():
            continue
        m = onnx.load(str(path), load_external_data=False)
        used = _node_domains(m.graph) | {f.domain or "ai.onnx" for f in m.functions}
        out[name] = {"ir_version": int(m.ir_version),
                     "opsets": {(o.domain or "ai.onnx"): int(o.version) for o in m.opset_import
                                if (o.domain or "ai.onnx") in used}}
    return out


def library_versions() -> dict:
    """The versions that wrote and checked a repository (ExportReport.versions)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for dist in ("captioner", "torch", "onnx", "onnxruntime", "timm", "tokenizers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


# ------------------------------------------------------------------ entry point
def export(checkpoint: str, out: str, device: str = "gpu", quantize: str | None = None, verify: bool = True,
           parity_images: int = 8, max_batch: int = MAX_BATCH, optimize: bool = True, force: bool = False,
           decoder_dtype: str = "float32") -> ExportReport:
    """Write the repository beside `out` and rename it into place. `out` must be new, empty or a
    repository written by export (it holds REPOSITORY_MARKER), unless `force`. `decoder_dtype`
    float16 writes the decode loop's step graph in fp16 (for GPUs: half the bytes per step and
    the cache kept in place)."""
    if decoder_dtype not in DTYPES:
        raise ValueError(f"decoder_dtype must be one of {sorted(DTYPES)}, got {decoder_dtype!r}")
    if quantize and quantize not in QUANTIZE:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if quantize and decoder_dtype != "float32":
        raise ValueError(f"--quantize {quantize} quantizes fp32 graphs; it cannot be combined with "
                         f"--decoder-dtype {decoder_dtype} (choose one)")
    final = Path(out).absolute()
    check_output_folder(final, force)
    ck = load_checkpoint(checkpoint)
    final.parent.mkdir(parents=True, exist_ok=True)
    repo = sibling_folder(final, "new")  # written beside, renamed into place at the end
    try:
        report = _write_repository(ck, repo, device, quantize, verify, parity_images, max_batch, optimize,
                                   decoder_dtype)
        replace_folder(repo, final)
    except BaseException:
        shutil.rmtree(repo, ignore_errors=True)
        raise
    log.info("wrote Triton model repository %s (models: %s)", final, ", ".join(sorted(ALL_MODELS)))
    return report


def check_output_folder(out: Path, force: bool = False) -> None:
    """Refuse to replace anything but an empty folder or a repository written by export."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise UnsafeOutputError(f"--out {out} exists and is not a folder; export will not replace it",
                                hint="give a new folder name")
    if force or (out / REPOSITORY_MARKER).is_file() or not any(out.iterdir()):
        return
    shown = sorted(p.name for p in out.iterdir())
    raise UnsafeOutputError(
        f"--out {out} is not empty and is not a model repository written by `captioner export` "
        f"(no {REPOSITORY_MARKER}; it holds {', '.join(shown[:5])}{', ...' if len(shown) > 5 else ''})",
        hint="give a new or empty folder, or add --force to replace it and everything in it")


def _write_repository(ck: LoadedCheckpoint, repo: Path, device: str, quantize: str | None, verify: bool,
                      parity_images: int, max_batch: int, optimize: bool,
                      decoder_dtype: str = "float32") -> ExportReport:
    d = export_onnx(ck, repo)
    write_serving_files(repo, d, device, max_batch, ck.preprocess, ck.tokenizer, ck.model.cfg.max_new_tokens)
    # no absolute paths: the report travels with the repository (to S3, other machines)
    report = ExportReport(checkpoint=ck.path.name, step=ck.step, dims=d, device=device, onnx=onnx_versions(repo),
                          versions=library_versions())
    if optimize:
        report.fusions = optimize_graphs(repo, ck)
    report.kv_cache = write_decoder_step(ck, repo, device, d.P, decoder_dtype)
    report.decoder_dtype = decoder_dtype
    step = repo / DECODE_LOOP / "1" / DECODER_GRAPH_FILE
    # the optimizer rewrites an fp16 graph's attention nodes with attributes that Triton 24.10's
    # onnxruntime 1.19.2 refuses (its GroupQueryAttention schema has no k_quant_type): fp16 ships as written
    report.fusions[DECODE_LOOP] = optimize_decoder_step(repo, ck) \
        if optimize and decoder_dtype == "float32" else fused_operator_counts(step)
    if verify:
        report.parity = check_parity(ck, repo, parity_images)
    if quantize in QUANTIZE:
        if quantize == "int8":
            quantize_int8(repo)
        else:
            report.step_graph_int4 = quantize_int4(repo)
        q = check_parity(ck, repo, parity_images, fail=False)
        setattr(report, f"parity_{quantize}", q)
        log.info("%s parity: greedy captions equal %d/%d, logits max|diff| %.3f, decode loop log-probs "
                 "max|diff| %.3f (report only)", quantize, q.captions_equal, q.images, q.logits_max_abs_diff,
                 q.loop_logprobs_max_abs_diff)
    elif quantize:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    report.onnx = onnx_versions(repo)  # after optimisation/quantisation: what Triton will load
    report.save(repo)
    save_config(ck.config, repo / CONFIG_FILE)
    write_marker(repo, {"checkpoint": str(ck.path), "step": ck.step})
    check_repository(repo)  # what Triton would refuse, refused here
    return report
