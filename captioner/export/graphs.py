"""The decode loop's step graph (decode_loop/<version>/decoder.onnx), written node by node from
the trained decoder's weights, as onnxruntime-genai's model builder writes LLM graphs: one
token per row per run, attention as onnxruntime's fused contrib ops, the KV cache per layer.

Why written rather than traced: the traced decoder (decoder/<version>/model.onnx, Triton's
`decoder` model) stacks the cache of every layer in one tensor, so each step slices the
cross K/V and the past out of it and concatenates a new present; onnxruntime's optimizer
does not fuse its attention. Here:
  - self-attention is `com.microsoft.GroupQueryAttention` with kv_num_heads = num_heads (plain
    multi-head attention) over a preallocated [B, H, max_len, Dh] buffer per layer: when the
    caller binds the same OrtValue as past_key.i and present_key.i the kernel appends the new
    position in place (contrib_ops/cpu/bert/gqa_attention_base.h: `past_present_share_buffer`
    is `past_key == present_key`), so no step copies the past. CUDA registers that op for
    fp16/bf16 only (contrib_ops/cuda/bert/group_query_attention.cc `REGISTER_KERNEL_TYPED`),
    so an fp32 graph for a GPU uses the op below; an fp16 graph (`--decoder-dtype float16`, half
    the weight bytes per step) keeps GroupQueryAttention on the GPU too;
  - `com.microsoft.MultiHeadAttention` with past_key/past_value -> present (the kernel appends;
    registered for fp32 on CPU and CUDA) - `cache="append"`. Newer onnxruntime runs that op in
    place on CUDA when `past_sequence_length` and `cache_indirection` are given
    (contrib_ops/cuda/bert/multihead_attention.cc: `past_present_share_buffer`), but the 1.19.2
    that Triton 24.10 ships (deployment.TRITON_ONNXRUNTIME) has no such inputs in that op's
    schema (query, key, value, bias, key_padding_mask, relative_position_bias, past_key,
    past_value), so a node with them is refused; `DecoderMaskedMultiHeadAttention` (in place,
    fp32) has no CPU kernel in 1.19.2 (`get_all_opkernel_def()` lists none);
  - cross-attention is `com.microsoft.MultiHeadAttention` with key/value given per layer in
    [B, H, P, Dh] (BNSH), bound once per caption, never sliced per step;
  - only the last position exists, so the vocabulary projection is [B, 1, V].
Model file stays free of export code; `captioner.export.parity` checks this graph against PyTorch
(teacher-forced log-probs and captions) before anything is published.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from captioner.core.names import (CROSS_KEY, CROSS_VALUE, INPUT_IDS, KV_CACHE_META, LOGITS, MAX_LEN_META, PAST_KEY,
                                  PAST_LENGTH, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE)

MS = "com.microsoft"
CACHE_MODES = ("in_place", "append")
ATTENTION_OPS = ("MultiHeadAttention", "GroupQueryAttention", "Attention", "DecoderMaskedMultiHeadAttention")


def cache_mode_for(device: str, dtype: str = "float32") -> str:
    """The cache a graph for `device` keeps: in place (GroupQueryAttention) on CPU, and on a GPU
    for an fp16 graph; appended (MultiHeadAttention) for an fp32 graph on a GPU, where the
    in-place op has no fp32 kernel (see the module docstring)."""
    return "in_place" if device == "cpu" or dtype == "float16" else "append"


class _Graph:
    def __init__(self, float_type=np.float32):
        self.nodes, self.inits, self.n, self.float_type = [], [], 0, float_type

    def w(self, name: str, a) -> str:
        a = np.asarray(a)
        if a.dtype.kind == "f":
            a = a.astype(self.float_type)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    def op(self, op_type: str, inputs: list, n_out: int = 1, domain: str = "", names: tuple = (), **attrs):
        """Add a node; its outputs get `names` (graph outputs) or generated names."""
        self.n += 1
        outs = list(names) or [f"{op_type.lower()}_{self.n}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self.n}", domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def linear(self, x: str, lin, name: str) -> str:
        """PyTorch Linear: x @ W^T + b, as MatMul + Add (what int8 dynamic quantization rewrites)."""
        y = self.op("MatMul", [x, self.w(f"{name}.weight_t", _np(lin.weight).T)])
        return self.op("Add", [y, self.w(f"{name}.bias", _np(lin.bias))]) if lin.bias is not None else y

    def layer_norm(self, x: str, ln, name: str) -> str:
        return self.op("LayerNormalization", [x, self.w(f"{name}.weight", _np(ln.weight)),
                                              self.w(f"{name}.bias", _np(ln.bias))], axis=-1, epsilon=float(ln.eps))


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}


def build_decoder_step(decoder, patches: int, cache: str = "in_place", dtype: str = "float32",
                       opset: int = 17) -> onnx.ModelProto:
    """The step graph of a `captioner.modeling.model.CaptionDecoder` (eval mode: no dropout) over an
    encoder with `patches` tokens. Inputs: input_ids [B,1] int64, past_sequence_length [1]
    int32, per layer i cross_key.i / cross_value.i [B,H,P,Dh] and past_key.i / past_value.i;
    outputs logits [B,1,V] and per layer present_key.i / present_value.i. `dtype` float16
    stores the weights and computes in fp16 (the cross K/V and the cache are fp16 too; logits
    come out as fp32)."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    np_type, T = DTYPES[dtype]
    cfg = decoder.cfg
    L, H, D, V = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.vocab_size
    Dh = D // H
    g = _Graph(np_type)
    vi = helper.make_tensor_value_info
    past_dim = "max_len" if cache == "in_place" else "past_len"
    present_dim = "max_len" if cache == "in_place" else "total_len"
    inputs = [vi(INPUT_IDS, TensorProto.INT64, ["batch", 1]), vi(PAST_LENGTH, TensorProto.INT32, [1])]
    outputs = [vi(LOGITS, TensorProto.FLOAT, ["batch", 1, V])]
    for i in range(L):
        inputs += [vi(CROSS_KEY.format(i), T, ["batch", H, patches, Dh]),
                   vi(CROSS_VALUE.format(i), T, ["batch", H, patches, Dh]),
                   vi(PAST_KEY.format(i), T, ["batch", H, past_dim, Dh]),
                   vi(PAST_VALUE.format(i), T, ["batch", H, past_dim, Dh])]
        outputs += [vi(PRESENT_KEY.format(i), T, ["batch", H, present_dim, Dh]),
                    vi(PRESENT_VALUE.format(i), T, ["batch", H, present_dim, Dh])]

    # token + position embedding; the position of this token is the cache length
    position = g.op("Cast", [PAST_LENGTH], to=TensorProto.INT64)
    pos = g.op("Gather", [g.w("pos_emb", _np(decoder.pos_emb.weight)), position])
    x = g.op("Add", [g.op("Gather", [g.w("tok_emb", _np(decoder.tok_emb.weight)), INPUT_IDS]), pos])  # [B,1,D]
    if cache == "in_place":  # GroupQueryAttention's lengths: seqlens_k = total - 1 per row, total as a scalar
        batch = g.op("Slice", [g.op("Shape", [INPUT_IDS]), g.w("c_0", np.array([0], np.int64)),
                               g.w("c_1", np.array([1], np.int64))])
        seqlens_k = g.op("Expand", [PAST_LENGTH, batch])
        total = g.op("Squeeze", [g.op("Add", [PAST_LENGTH, g.w("c_1i", np.array([1], np.int32))]),
                                 g.w("c_0a", np.array([0], np.int64))])
    split = g.w("qkv_split", np.array([D, D, D], np.int64))
    for i, blk in enumerate(decoder.blocks):
        p = f"blocks.{i}"
        q, k, v = g.op("Split", [g.linear(g.layer_norm(x, blk.ln1, f"{p}.ln1"), blk.qkv, f"{p}.qkv"), split],
                       n_out=3, axis=-1)
        past = [PAST_KEY.format(i), PAST_VALUE.format(i)]
        outs = (f"self_attention_{i}", PRESENT_KEY.format(i), PRESENT_VALUE.format(i))
        if cache == "in_place":
            a, _, _ = g.op("GroupQueryAttention", [q, k, v, *past, seqlens_k, total], domain=MS, names=outs,
                           num_heads=H, kv_num_heads=H)
        else:
            a, _, _ = g.op("MultiHeadAttention", [q, k, v, "", "", "", *past], domain=MS, names=outs, num_heads=H)
        x = g.op("Add", [x, g.linear(a, blk.self_proj, f"{p}.self_proj")])
        qc = g.linear(g.layer_norm(x, blk.ln2, f"{p}.ln2"), blk.q_cross, f"{p}.q_cross")
        c = g.op("MultiHeadAttention", [qc, CROSS_KEY.format(i), CROSS_VALUE.format(i)], domain=MS, num_heads=H)
        x = g.op("Add", [x, g.linear(c, blk.cross_proj, f"{p}.cross_proj")])
        h = g.linear(g.layer_norm(x, blk.ln3, f"{p}.ln3"), blk.mlp.fc, f"{p}.mlp.fc")
        x = g.op("Add", [x, g.linear(g.op("Gelu", [h], domain=MS), blk.mlp.proj, f"{p}.mlp.proj")])
    head = [g.layer_norm(x, decoder.ln_f, "ln_f"), g.w("head.weight_t", _np(decoder.head.weight).T)]
    if T == TensorProto.FLOAT:
        g.op("MatMul", head, names=(LOGITS,))
    else:
        g.op("Cast", [g.op("MatMul", head)], names=(LOGITS,), to=TensorProto.FLOAT)
    graph = helper.make_graph(g.nodes, "captioner_decoder_step", inputs, outputs, g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                          producer_name="captioner")
    m.ir_version = 8  # onnxruntime 1.19.2 (Triton 24.10) reads up to IR 10 (11 refused)
    helper.set_model_props(m, {KV_CACHE_META: cache, MAX_LEN_META: str(cfg.max_len)})
    onnx.checker.check_model(m)
    return m


# op types that stand for fused work (onnxruntime contrib ops, or the ONNX ops its optimizer
# fuses subgraphs into); counted per written graph for the export report
FUSED_OP_TYPES = frozenset({
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "DecoderMaskedMultiHeadAttention",
    "DecoderMaskedSelfAttention", "PackedAttention", "PackedMultiHeadAttention", "SparseAttention",
    "RotaryEmbedding", "EmbedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
    "LayerNormalization", "SimplifiedLayerNormalization", "BiasGelu", "Gelu", "FastGelu", "QuickGelu",
    "BiasSplitGelu", "BiasAdd", "BiasSoftmax", "FusedMatMul", "FusedConv", "QOrderedAttention", "QAttention",
})


def op_type_counts(model: "onnx.ModelProto | str | Path") -> Counter:
    """{op type: count} of every node of a graph (a ModelProto or a path), subgraphs included."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    counts: Counter = Counter()

    def walk(graph):
        for n in graph.node:
            counts[n.op_type] += 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(model.graph)
    return counts


def fused_operator_counts(model: "onnx.ModelProto | str | Path") -> dict[str, int]:
    """{op type: count} of the fused operators of a graph as written: what the serving runtime
    will execute (the export report's "fusions")."""
    return {k: v for k, v in sorted(op_type_counts(model).items()) if k in FUSED_OP_TYPES}


def attention_op_counts(model: "onnx.ModelProto | str | Path") -> dict[str, int]:
    """The fused attention nodes of a graph, and its Softmax nodes (what an unfused attention has)."""
    return {k: v for k, v in sorted(op_type_counts(model).items()) if k in ATTENTION_OPS or k == "Softmax"}


def step_weight_bytes(model: "onnx.ModelProto | str | Path", rows: int = 1) -> int:
    """Bytes of constant weights one run of a one-token step graph reads for `rows` captions:
    every initializer in full (MatMul / MatMulNBits / MatMulInteger weights, their scales,
    biases, LayerNorm parameters), except a table read only through Gather (the token and
    position embeddings), of which `rows` rows are read. The memory floor of a decoder step at
    batch 1 is these bytes over the machine's memory bandwidth (captioner/bench/caption_latency.py)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    users: dict[str, set] = {}
    for n in model.graph.node:
        for k, name in enumerate(n.input):
            users.setdefault(name, set()).add((n.op_type, k))
    total = 0
    for t in model.graph.initializer:
        size = int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if t.dims and users.get(t.name) and all(u == ("Gather", 0) for u in users[t.name]):
            size = size // int(t.dims[0]) * min(rows, int(t.dims[0]))
        total += size
    return total
