"""Graph rewrites after export: onnxruntime's transformer fusions (`optimize_graphs`,
`optimize_decoder_step`) and quantisation (`quantize_int8`: dynamic int8; `quantize_int4`:
the decode loop's step graph 4-bit weight-only), in place in the repository."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import onnx

from captioner.core.names import DECODE_LOOP, DECODER, DECODER_GRAPH_FILE, ENCODER, ONNX_MODEL_FILE
from captioner.export.graphs import fused_operator_counts, op_type_counts
from captioner.modeling.checkpoint import LoadedCheckpoint

log = logging.getLogger(__name__)

# --quantize: int8 = every graph dynamic int8; int4 = the decode loop's step graph 4-bit
# weight-only (MatMulNBits), the encoder and the traced decoder int8
QUANTIZE = ("int8", "int4")


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
        f = repo / name / "1" / ONNX_MODEL_FILE
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
            # ConvInteger(10)", seen on the real server, tests/serving/test_triton_server.py)
            quantize_dynamic(str(fp32), str(f), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"],
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            logging.disable(logging.NOTSET)
            fp32.unlink(missing_ok=True)


def _graph_file(repo: Path, name: str) -> Path:
    return repo / DECODE_LOOP / "1" / DECODER_GRAPH_FILE if name == DECODE_LOOP else repo / name / "1" / ONNX_MODEL_FILE


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


