"""`captioner export`: checkpoint -> complete Triton model repository (ONNX encoder and
decoder, Python-backend preprocess and decode loop, ensemble), with a parity check of
onnxruntime against PyTorch that fails loudly. The decode loop's version folder also gets the
decoder graph it runs in process (decoder.onnx) and select_rows.onnx."""
from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from captioner.modeling.checkpoint import LoadedCheckpoint, load_checkpoint
from captioner.core.config import save_config
from captioner.core.decoding import DecodeParams
from captioner.core.errors import UnsafeOutputError
from captioner.modeling.inference import caption_tensor
from captioner.core.names import (CROSS_KV, DECODE_FILE, DECODE_LOOP, DECODER, DECODER_GRAPH_FILE, ENCODER,
                             ENCODER_HIDDEN, INPUT_IDS, LOGITS, PAST_KV, PIXEL_VALUES, PREPROCESS, PREPROCESS_FILE,
                             PRESENT_KV, ROWS, SELECT_ROWS_FILE, SELECTED, STATE, TOKENIZER_FILE)
from captioner.export.attention import fused_vit_attention
from captioner.export.graphs import DTYPES, build_decoder_step, cache_mode_for, fused_operator_counts, op_type_counts
from captioner.serving.core import DecodeLoop, image_bytes_to_pixels
from captioner.serving.triton_repo import (ALL_MODELS, MAX_BATCH, REPOSITORY_MARKER, build_configs, check_repository,
                                   write_configs, write_marker)

log = logging.getLogger(__name__)
SOURCES = Path(__file__).resolve().parents[1] / "serving" / "triton"  # the Python-backend models, copied in as model.py


class ParityError(RuntimeError):
    pass


# --quantize: int8 = every graph dynamic int8; int4 = the decode loop's step graph 4-bit
# weight-only (MatMulNBits), the encoder and the traced decoder int8
QUANTIZE = ("int8", "int4")

# An fp16 step graph's log-probs may differ from PyTorch's fp32 by fp16 rounding (~1e-3 relative
# per op); beyond this the graph is wrong, not rounded.
FP16_LOGPROB_ATOL = 0.1


class _EncoderGraph(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, pixel_values):
        return self.m.encode_for_decoding(pixel_values)


class _DecoderGraph(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, cross_kv, past_kv):
        return self.m.decode_step(input_ids, cross_kv, past_kv)


@dataclass
class Dims:
    C: int
    H: int
    W: int
    P: int
    D: int
    L: int
    heads: int
    Dh: int
    V: int


def _dims(ck: LoadedCheckpoint) -> Dims:
    m = ck.model.eval()  # a BatchNorm in training mode would move its running statistics here
    c = m.cfg
    C, H, W = ck.preprocess.input_size
    with torch.no_grad():
        P = m.encode(torch.zeros(1, C, H, W)).shape[1]
    return Dims(C, H, W, P, c.d_model, c.n_layers, c.n_heads, c.d_model // c.n_heads, c.vocab_size)


def export_onnx(ck: LoadedCheckpoint, repo: Path, opset: int = 17) -> Dims:
    """Write encoder/1/model.onnx and decoder/1/model.onnx (weights inline). Dummy inputs
    use batch 2, 2 new tokens and 3 past positions so no dynamic axis is traced as 1."""
    d = _dims(ck)
    m = ck.model.eval()
    (repo / ENCODER / "1").mkdir(parents=True, exist_ok=True)
    (repo / DECODER / "1").mkdir(parents=True, exist_ok=True)
    export_encoder_graph(m, (d.C, d.H, d.W), repo / ENCODER / "1" / "model.onnx", opset)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ids = torch.randint(4, d.V, (2, 2))
        cross = torch.randn(2, 2 * d.L, d.heads, d.P, d.Dh)
        past = torch.randn(2, 2 * d.L, d.heads, 3, d.Dh)
        torch.onnx.export(_DecoderGraph(m).eval(), (ids, cross, past), str(repo / DECODER / "1" / "model.onnx"),
                          dynamo=False, opset_version=opset, input_names=[INPUT_IDS, CROSS_KV, PAST_KV],
                          output_names=[LOGITS, PRESENT_KV],
                          dynamic_axes={INPUT_IDS: {0: "batch", 1: "new_tokens"}, CROSS_KV: {0: "batch"},
                                        PAST_KV: {0: "batch", 3: "past_len"}, LOGITS: {0: "batch", 1: "new_tokens"},
                                        PRESENT_KV: {0: "batch", 3: "total_len"}})
    return d


def export_encoder_graph(m, input_size: tuple[int, int, int], path: Path, opset: int = 17) -> list[str]:
    """The encoder graph (pixel_values -> encoder_hidden, cross_kv), batch dynamic, with each
    plain timm ViT attention written as one com.microsoft.MultiHeadAttention node
    (captioner.export.attention). Returns the names of the fused attention modules."""
    with fused_vit_attention(m.encoder) as fused, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_EncoderGraph(m).eval(), (torch.randn(2, *input_size),), str(path),
                          dynamo=False, opset_version=opset, input_names=[PIXEL_VALUES],
                          output_names=[ENCODER_HIDDEN, CROSS_KV],
                          dynamic_axes={PIXEL_VALUES: {0: "batch"}, ENCODER_HIDDEN: {0: "batch"},
                                        CROSS_KV: {0: "batch"}})
    log.info("encoder graph: %d attention layers written as MultiHeadAttention", len(fused))
    return fused


def write_select_rows(path: Path, dtype: str = "float32", opset: int = 17) -> None:
    """select_rows.onnx: selected = Gather(state, rows, axis=0) over one layer's [R, H, S, Dh]
    cache or cross K/V tensor (of the step graph's `dtype`), so the decode loop keeps /
    reorders / duplicates rows on the session's device."""
    from onnx import TensorProto, helper

    T = DTYPES[dtype][1]
    dims = ["rows_in", "heads", "positions", "head_dim"]
    g = helper.make_graph(
        [helper.make_node("Gather", [STATE, ROWS], [SELECTED], axis=0)], "select_rows",
        [helper.make_tensor_value_info(STATE, T, dims),
         helper.make_tensor_value_info(ROWS, TensorProto.INT64, ["rows_out"])],
        [helper.make_tensor_value_info(SELECTED, T, ["rows_out"] + dims[1:])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def write_decoder_step(ck: LoadedCheckpoint, repo: Path, device: str, patches: int, dtype: str = "float32") -> str:
    """decode_loop/1/decoder.onnx: the step graph its in-process session runs (see
    captioner/serving/triton/decode_loop.py for why it lives there), written from the weights with fused
    attention and a KV cache kept in place (CPU, or fp16 on a GPU) or appended (fp32 on a GPU)
    (captioner.export.graphs), and select_rows.onnx for the same dtype. Returns the cache mode."""
    mode = cache_mode_for(device, dtype)
    onnx.save(build_decoder_step(ck.model.decoder.eval(), patches, mode, dtype),
              str(repo / DECODE_LOOP / "1" / DECODER_GRAPH_FILE))
    write_select_rows(repo / DECODE_LOOP / "1" / SELECT_ROWS_FILE, dtype)
    return mode


# ------------------------------------------------------------------ parity
def held_out_records(ck: LoadedCheckpoint, n: int = 0, cache_dir: str | Path | None = None) -> list:
    """The checkpoint's held-out images (test split, then val when too few; n=0: the whole test
    split) as ImageRecords: for a dataset written by `captioner ingest` the split is the one its
    manifest fixes (images extracted to `cache_dir`), else the split `assign_splits` gives."""
    from captioner.data.sources import assign_splits, by_split, read_records
    from captioner.data.manifest import is_shard_source, materialize, open_shard_source

    c = ck.config.data
    if is_shard_source(c.source):
        import tempfile

        store, manifest = open_shard_source(c.source)
        cache = Path(cache_dir or tempfile.mkdtemp(prefix="captioner-heldout-"))
        recs = materialize(store, manifest, "test", cache / "test", n)
        if n and len(recs) < n:
            recs += materialize(store, manifest, "val", cache / "val", n - len(recs))
        return recs
    recs, _ = read_records(c.source, c.format, c.image_root)
    assign_splits(recs, c.val_fraction, c.test_fraction, c.split_seed)
    return (by_split(recs, "test") + by_split(recs, "val"))[:n] if n else by_split(recs, "test")


def sample_images(ck: LoadedCheckpoint, n: int = 8) -> list[tuple[str, bytes]]:
    """Held-out images from the checkpoint's data (its manifest's test split for a shard
    dataset) when reachable, else generated scenes."""
    try:
        out = [(r.image_id, Path(r.path).read_bytes()) for r in held_out_records(ck, n)]
        if out:
            return out
    except Exception as e:  # noqa: BLE001 - fall back to generated images
        log.info("parity images: data source unavailable (%s); using generated images", e)
    from captioner.data.synthetic import draw_scene

    rng, out = random.Random(0), []
    for i in range(n):
        img, _ = draw_scene(rng)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append((f"generated-{i}.jpg", buf.getvalue()))
    return out


@dataclass
class ParityReport:
    images: int = 0
    encoder_max_abs_diff: float = 0.0
    logits_max_abs_diff: float = 0.0
    loop_logprobs_max_abs_diff: float = 0.0  # the decode loop's step graph, teacher-forced
    captions_equal: int = 0
    mismatches: list = field(default_factory=list)
    quantized: dict | None = None
    tolerances: dict = field(default_factory=dict)  # the max|diff| each check allows
    passed: bool = True


def check_parity(ck: LoadedCheckpoint, repo: Path, n_images: int = 8, atol: float = 1e-3,
                 fail: bool = True) -> ParityReport:
    from captioner.serving.onnx_runtime import OrtCaptioner

    imgs = sample_images(ck, n_images)
    pixels = image_bytes_to_pixels(np.array([b for _, b in imgs], dtype=object), ck.preprocess)
    ort_m = OrtCaptioner(repo)
    m = ck.model.eval()
    rep = ParityReport(images=len(imgs))
    x = torch.from_numpy(pixels)
    with torch.no_grad():
        mem_t, cross_t = m.encode_for_decoding(x)
    mem_o, cross_o = ort_m.run_encoder(pixels)
    rep.encoder_max_abs_diff = float(max(np.abs(mem_o - mem_t.numpy()).max(), np.abs(cross_o - cross_t.numpy()).max()))
    params = DecodeParams(max_new_tokens=m.cfg.max_new_tokens)
    caps_t = caption_tensor(m, ck.tokenizer, x, DecodeParams(**vars(params)))
    loop = DecodeLoop.in_process(repo / DECODE_LOOP / "1")  # the served path: in-process bound decoder
    caps_o = loop.caption(cross_o, DecodeParams(**vars(params)))
    # per-step logits, teacher-forced on PyTorch's captions, through the cache in both
    ids = [[ck.tokenizer.bos_id] + ck.tokenizer.encode(c, m.cfg.max_len)[1:-1] for c in caps_t]
    T = min(len(s) for s in ids)
    tok = np.array([s[:T] for s in ids], dtype=np.int64)
    past_o = np.zeros((len(imgs), 2 * m.cfg.n_layers, m.cfg.n_heads, 0, m.cfg.d_model // m.cfg.n_heads), np.float32)
    past_t, worst = None, 0.0
    for t in range(T):
        lo, past_o = ort_m.run_decoder(tok[:, t:t + 1], cross_o, past_o)
        with torch.no_grad():
            lt, past_t = m.decode_step(torch.from_numpy(tok[:, t:t + 1]), cross_t, past_t)
        worst = max(worst, float(np.abs(lo - lt.numpy()).max()))
    rep.logits_max_abs_diff = worst
    rep.loop_logprobs_max_abs_diff = _loop_logprobs_diff(loop, cross_o, tok, m, cross_t)
    rep.captions_equal = sum(a == b for a, b in zip(caps_t, caps_o))
    rep.mismatches = [{"image": n, "pytorch": a, "onnxruntime": b} for (n, _), a, b in zip(imgs, caps_t, caps_o) if a != b]
    log.info("parity on %d images: encoder max|diff| %.2e, logits max|diff| %.2e (decode loop's step graph: "
             "log-probs %.2e), greedy captions equal %d/%d", rep.images, rep.encoder_max_abs_diff,
             rep.logits_max_abs_diff, rep.loop_logprobs_max_abs_diff, rep.captions_equal, rep.images)
    fp16 = loop.kv_dtype == np.float16  # an fp16 step graph: log-probs within fp16's error, and a
    loop_atol = FP16_LOGPROB_ATOL if fp16 else atol * 10  # near-tie may flip a word (reported, not fatal)
    rep.tolerances = {"encoder_max_abs_diff": atol, "logits_max_abs_diff": atol * 10,
                      "loop_logprobs_max_abs_diff": loop_atol, "captions_must_match": not fp16}
    rep.passed = not (rep.encoder_max_abs_diff > atol or rep.logits_max_abs_diff > atol * 10
                      or rep.loop_logprobs_max_abs_diff > loop_atol or bool(rep.mismatches and not fp16))
    if fail and not rep.passed:
        raise ParityError(f"onnxruntime disagrees with PyTorch: {json.dumps(asdict(rep), indent=1)}")
    return rep


def _loop_logprobs_diff(loop, cross_o: np.ndarray, tok: np.ndarray, m, cross_t) -> float:
    """Largest |log-prob difference| between the decode loop's step graph (fed onnxruntime's
    cross K/V, as served) and PyTorch, teacher-forced on the same tokens."""
    from captioner.core.decoding import log_softmax

    step, past, worst = loop.make_step(cross_o), None, 0.0
    for t in range(tok.shape[1]):
        lo = step(tok[:, t])
        with torch.no_grad():
            lt, past = m.decode_step(torch.from_numpy(tok[:, t:t + 1]), cross_t, past)
        worst = max(worst, float(np.abs(lo - log_softmax(lt[:, -1].numpy())).max()))
    return worst


def optimize_graphs(repo: Path, ck: LoadedCheckpoint) -> dict:
    """onnxruntime's transformer fusions (LayerNorm/SkipLayerNorm, Gelu; attention where the
    pattern matches; the encoder's ViT attention is already one MultiHeadAttention node per
    block from export_encoder_graph, which the optimizer keeps). Contrib ops that Triton's
    onnxruntime backend also runs. Returns {graph: {fused op type: count}} counted in the
    written graphs. Measured on the seed-vit768 shape on 2 CPU cores: encoder ~25% and
    decoder steps ~15% faster."""
    from onnxruntime.transformers import optimizer

    stats = {}
    bb = ck.model.encoder.backbone
    enc_heads = int(getattr(getattr(bb, "blocks", [None])[0], "attn", None).num_heads) \
        if hasattr(bb, "blocks") and hasattr(bb.blocks[0], "attn") else 0
    todo = [(ENCODER, "vit" if enc_heads else "bert", enc_heads, int(bb.num_features) if enc_heads else 0),
            (DECODER, "bert", ck.model.cfg.n_heads, ck.model.cfg.d_model)]
    for name, mtype, heads, hidden in todo:
        f = repo / name / "1" / "model.onnx"
        m = optimizer.optimize_model(str(f), model_type=mtype, num_heads=heads, hidden_size=hidden, opt_level=1)
        m.save_model_to_file(str(f))
        stats[name] = fused_operator_counts(f)  # what the written graph runs, attention included
    log.info("onnxruntime fusions: %s", stats)
    return stats


def optimize_decoder_step(repo: Path, ck: LoadedCheckpoint) -> dict:
    """onnxruntime's LayerNorm/SkipLayerNorm and BiasGelu fusions on the decode loop's step graph
    (its attention is fused already); returns the graph's fused operators."""
    from onnxruntime.transformers import optimizer

    f = repo / DECODE_LOOP / "1" / DECODER_GRAPH_FILE
    c = ck.model.cfg
    logging.getLogger("onnxruntime.transformers.optimizer").setLevel(logging.ERROR)  # "producer not pytorch"
    m = optimizer.optimize_model(str(f), model_type="bert", num_heads=c.n_heads, hidden_size=c.d_model, opt_level=1)
    m.save_model_to_file(str(f))
    return fused_operator_counts(f)


def quantize_int8(repo: Path, graphs: tuple[str, ...] = (ENCODER, DECODER, DECODE_LOOP)) -> None:
    """Dynamic int8: weights quantised per output channel (one scale per row of each weight
    matrix, which keeps small-norm rows from being flattened by one large row), activations
    quantised per tensor at run time. `graphs`: which models' graphs (DECODE_LOOP: its step graph)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for f in [_graph_file(repo, name) for name in graphs]:
        # no fp32 copy is kept: Triton copies a model's whole folder from S3 (the decode loop's
        # fp32 step graph alone is 229 MB at the seed-vit768 shape); re-export for fp32
        fp32 = f.with_name(f"{f.name}.fp32-tmp")
        shutil.move(f, fp32)
        # fused contrib ops defeat ONNX shape inference; their tensors are float
        logging.disable(logging.INFO)  # the quantizer logs every tensor to the root logger at INFO
        try:
            # MatMul/Gemm only: an int8-weight ConvInteger (the ViT patch embedding) has no kernel in
            # the onnxruntime Triton 24.10 ships (1.19.2: "Could not find an implementation for
            # ConvInteger(10)", seen on the real server, tests/serving/test_real_triton.py)
            quantize_dynamic(str(fp32), str(f), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"],
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            logging.disable(logging.NOTSET)
            fp32.unlink(missing_ok=True)


def _node_domains(graph) -> set[str]:
    out = set()
    for n in graph.node:
        out.add(n.domain or "ai.onnx")
        for a in n.attribute:  # If/Loop/Scan bodies
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out |= _node_domains(g)
    return out


def _graph_file(repo: Path, name: str) -> Path:
    return repo / DECODE_LOOP / "1" / DECODER_GRAPH_FILE if name == DECODE_LOOP else repo / name / "1" / "model.onnx"


# 4-bit weight-only step graph. Block of 32 input rows per scale (the fp32 scale adds 1 bit per
# weight to the 4-bit code: ~5.1 bits vs 32 for fp32, 8 for int8), asymmetric (a 4-bit zero
# point per block, 1/8 bit per weight): on the demo's checkpoint (after 3 epochs, its 154
# held-out images) symmetric blocks lost 2.56% CIDEr-D (75% of captions equal to fp32's),
# asymmetric 1.52% (86%); blocks of 16 did not help (-2.75%). accuracy_level 4: the CPU kernel
# quantises each block of the activations to int8 and runs an int8 dot product (VNNI where the
# CPU has it); level 0 keeps fp32 activations in the kernel and dequantises every weight per
# step: the same quality here (-2.56% symmetric), and slower (seed-vit768 step graph, 2 threads:
# 13.4 ms/step vs 4.7 ms with level 4; int8 7.2 ms). The CUDA kernel ignores the level
# (fp32/fp16 compute). Contrib op com.microsoft.MatMulNBits; kernels for float on CPU and CUDA
# in the onnxruntime Triton ships (see quantize_int4).
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4
INT4_SYMMETRIC = False


def quantize_int4(repo: Path) -> dict[str, int]:
    """The decode loop's step graph with every MatMul (vocabulary projection included) as
    com.microsoft.MatMulNBits, 4-bit block-wise weights (onnxruntime's own
    MatMulNBitsQuantizer, round to nearest); the encoder and the traced decoder in int8
    (`quantize_int8`). Returns the step graph's {op type: count} for MatMul / MatMulNBits.

    Kernels in the onnxruntime that the pinned Triton release ships
    (captioner.core.deployment.TRITON_ONNXRUNTIME): CPU - contrib_ops/cpu/cpu_contrib_kernels.cc
    registers ONNX_OPERATOR_TYPED_KERNEL_CLASS_NAME(kCpuExecutionProvider, kMSDomain, 1, float,
    MatMulNBits) (the graph is run in that exact version by
    tests/serving/test_triton_onnxruntime.py); CUDA - contrib_ops/cuda/cuda_contrib_kernels.cc
    registers (kCudaExecutionProvider, kMSDomain, 1, float, MatMulNBits) and MLFloat16; the
    kernel classes onnxruntime::contrib::cuda::MatMulNBits<float> / <MLFloat16> are in
    libonnxruntime_providers_cuda.so of the onnxruntime-gpu 1.19.2, 1.20.0 and 1.20.2 wheels
    (1.20.1 is not on PyPI; it sits between the two 1.20 releases that have it)."""
    quantize_int8(repo, (ENCODER, DECODER))
    f = _graph_file(repo, DECODE_LOOP)
    model = onnx.load(str(f))
    root = logging.getLogger()
    state = root.level, list(root.handlers)
    # importing the quantizer module runs logging.basicConfig(level=INFO) on the root logger
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.setLevel(state[0])
    for h in root.handlers[:]:
        if h not in state[1]:
            root.removeHandler(h)
    logging.disable(logging.INFO)  # one line per node otherwise
    try:
        q = MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=INT4_SYMMETRIC,
                                 accuracy_level=INT4_ACCURACY_LEVEL)
        q.process()
    finally:
        logging.disable(logging.NOTSET)
    out = q.model.model
    onnx.checker.check_model(out)
    onnx.save(out, str(f))
    counts = op_type_counts(out)
    if counts["MatMul"]:  # a MatMul with a weight the quantizer skipped would read 4 bytes per weight per step
        raise RuntimeError(f"{f}: {counts['MatMul']} MatMul node(s) left unquantized by MatMulNBitsQuantizer")
    return {"MatMul": counts["MatMul"], "MatMulNBits": counts["MatMulNBits"]}


def onnx_versions(repo: Path) -> dict:
    """IR version and the opsets each exported graph uses (the operator domains its nodes are
    in; an optimizer declares more than it uses): what the serving runtime must support."""
    out = {}
    graphs = {ENCODER: repo / ENCODER / "1" / "model.onnx", DECODER: repo / DECODER / "1" / "model.onnx",
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
    """The versions that wrote and checked a repository (its export_report.json)."""
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
           decoder_dtype: str = "float32") -> dict:
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
    repo = _sibling(final, "new")  # written beside, renamed into place at the end
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


def replace_folder(new: Path, final: Path) -> None:
    """Put the finished folder `new` at `final`. An existing `final` is swapped with `new` in one
    step where the kernel can (Linux renameat2 RENAME_EXCHANGE), else renamed aside just before
    `new` is renamed in; the old one is deleted only after the new one is in place."""
    if not final.exists():
        os.rename(new, final)
        return
    if _exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old repository
        return
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 with RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _sibling(final: Path, tag: str) -> Path:
    p = final.with_name(f".{final.name}.{tag}-{uuid.uuid4().hex[:8]}")
    p.mkdir()  # the process umask applies, as for the repository's other folders
    return p


def _write_repository(ck: LoadedCheckpoint, repo: Path, device: str, quantize: str | None, verify: bool,
                      parity_images: int, max_batch: int, optimize: bool, decoder_dtype: str = "float32") -> dict:
    d = export_onnx(ck, repo)
    cfgs = build_configs(d, "KIND_GPU" if device == "gpu" else "KIND_CPU", max_batch)
    write_configs(repo, cfgs)
    for name in (PREPROCESS, DECODE_LOOP):
        shutil.copyfile(SOURCES / f"{name}.py", repo / name / "1" / "model.py")
    (repo / PREPROCESS / "1" / PREPROCESS_FILE).write_text(json.dumps(ck.preprocess.to_dict(), indent=2))
    ck.tokenizer.save(repo / DECODE_LOOP / "1" / TOKENIZER_FILE)
    (repo / DECODE_LOOP / "1" / DECODE_FILE).write_text(json.dumps({
        "bos_id": ck.tokenizer.bos_id, "eos_id": ck.tokenizer.eos_id, "max_new_tokens": ck.model.cfg.max_new_tokens,
        "n_layers": d.L, "n_heads": d.heads, "head_dim": d.Dh}, indent=2))
    # no absolute paths: the report travels with the repository (to S3, other machines)
    report = {"checkpoint": ck.path.name, "step": ck.step, "dims": asdict(d), "device": device,
              "onnx": onnx_versions(repo), "versions": library_versions()}
    if optimize:
        report["fusions"] = optimize_graphs(repo, ck)
    report["kv_cache"] = write_decoder_step(ck, repo, device, d.P, decoder_dtype)
    report["decoder_dtype"] = decoder_dtype
    step = repo / DECODE_LOOP / "1" / DECODER_GRAPH_FILE
    # the optimizer rewrites an fp16 graph's attention nodes with attributes that Triton 24.10's
    # onnxruntime 1.19.2 refuses (its GroupQueryAttention schema has no k_quant_type): fp16 ships as written
    report.setdefault("fusions", {})[DECODE_LOOP] = optimize_decoder_step(repo, ck) \
        if optimize and decoder_dtype == "float32" else fused_operator_counts(step)
    if verify:
        report["parity"] = asdict(check_parity(ck, repo, parity_images))
    if quantize in QUANTIZE:
        if quantize == "int8":
            quantize_int8(repo)
        else:
            report["step_graph_int4"] = quantize_int4(repo)
        q = check_parity(ck, repo, parity_images, fail=False)
        report[f"parity_{quantize}"] = asdict(q)
        log.info("%s parity: greedy captions equal %d/%d, logits max|diff| %.3f, decode loop log-probs "
                 "max|diff| %.3f (report only)", quantize, q.captions_equal, q.images, q.logits_max_abs_diff,
                 q.loop_logprobs_max_abs_diff)
    elif quantize:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    report["onnx"] = onnx_versions(repo)  # after optimisation/quantisation: what Triton will load
    (repo / "export_report.json").write_text(json.dumps(report, indent=2))
    save_config(ck.config, repo / "config.yaml")
    write_marker(repo, {"checkpoint": str(ck.path), "step": ck.step})
    check_repository(repo)  # what Triton would refuse, refused here
    return report
