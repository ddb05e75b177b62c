"""The decode loop's step graph (captioner.export.graphs) has fused
attention, keeps its KV cache in place (no copy of the past per step) and gives PyTorch's
log-probs, through the same BoundDecoder that Triton's decode_loop model and `captioner serve` run."""
import numpy as np
import onnx
import pytest
import torch

from captioner.core import names
from captioner.core.config import ModelConfig
from captioner.core.decoding import log_softmax
from captioner.export.graphs import attention_op_counts, build_decoder_step, cache_mode_for
from captioner.export.torch_graphs import write_select_rows
from captioner.modeling.model import CaptionDecoder
from captioner.serving.onnx_runtime import BoundDecoder

L, HEADS, D, V, MAX_LEN, P = 2, 4, 32, 40, 10, 6


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    dec = CaptionDecoder(ModelConfig(d_model=D, n_layers=L, n_heads=HEADS, vocab_size=V, max_len=MAX_LEN,
                                     dropout=0.0)).eval()
    with torch.no_grad():
        for p in dec.parameters():
            p.normal_(0, 0.3)
    return dec


def _bound(decoder, tmp_path, cache, dtype="float32") -> BoundDecoder:
    onnx.save(build_decoder_step(decoder, P, cache, dtype), str(tmp_path / "step.onnx"))
    write_select_rows(tmp_path / "select.onnx", dtype)
    return BoundDecoder(tmp_path / "step.onnx", tmp_path / "select.onnx", threads=1)


# fp16 rounds each op to ~1e-3 relative: log-probs of this random decoder move by up to ~1e-2
TOLERANCE = {"float32": 1e-4, "float16": 3e-2}


def _reference(decoder, tokens, cross):
    with torch.no_grad():
        logits, _ = decoder(torch.from_numpy(tokens), torch.from_numpy(cross))
    return log_softmax(logits.numpy())


@pytest.mark.parametrize("cache,dtype", [("in_place", "float32"), ("append", "float32"), ("in_place", "float16")])
def test_step_graph_gives_pytorch_log_probs_through_a_row_reorder(decoder, tmp_path, cache, dtype):
    """Teacher-forced steps, with the rows reordered and duplicated half way (what beam search
    and finished rows do): every step's log-probs equal PyTorch's full-sequence forward."""
    rng = np.random.default_rng(0)
    cross = rng.standard_normal((3, 2 * L, HEADS, P, D // HEADS)).astype(np.float32)
    tokens = rng.integers(0, V, (3, MAX_LEN - 2))
    step = _bound(decoder, tmp_path, cache, dtype).step(cross)
    rows, worst = np.arange(3), 0.0
    for t in range(tokens.shape[1]):
        if t == 4:
            rows = np.array([2, 0, 0, 1])
            step.select(np.array([2, 0, 0, 1]))
        got = step(tokens[rows, t])
        want = _reference(decoder, tokens[rows, :t + 1], cross[rows])[:, -1]
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_in_place_cache_is_bound_once_and_never_moves(decoder, tmp_path, dtype):
    """Each layer's cache is one preallocated [R, H, max_len, Dh] buffer bound as past and
    present: the kernel appends in place, so no step allocates or copies the past."""
    d = _bound(decoder, tmp_path, "in_place", dtype)
    cross = np.random.default_rng(1).standard_normal((2, 2 * L, HEADS, P, D // HEADS)).astype(np.float32)
    step = d.step(cross)
    buffers = [p.data_ptr() for p in step.past]
    assert all(p.shape() == [2, HEADS, MAX_LEN, D // HEADS] for p in step.past)
    for t in range(5):
        step(np.full(2, 5 + t, np.int64))
        assert [p.data_ptr() for p in step.past] == buffers
        presents = step.binding.get_outputs()[1:]
        assert [o.data_ptr() for o in presents] == buffers, "present is a new tensor: the past was copied"


def test_a_step_past_the_models_positions_is_refused(decoder, tmp_path):
    step = _bound(decoder, tmp_path, "in_place").step(np.zeros((1, 2 * L, HEADS, P, D // HEADS), np.float32))
    for t in range(MAX_LEN):
        step(np.array([5]))
    with pytest.raises(ValueError, match=f"has {MAX_LEN} positions"):
        step(np.array([5]))


@pytest.mark.parametrize("cache", ["in_place", "append"])
def test_step_graph_attention_is_fused_and_nothing_concatenates_the_past(decoder, cache):
    m = build_decoder_step(decoder, P, cache)
    ops = attention_op_counts(m)
    assert "Softmax" not in ops, f"unfused attention: {ops}"
    assert sum(ops.values()) == 2 * L  # self- and cross-attention per layer
    assert not [n for n in m.graph.node if n.op_type == "Concat"], "the graph concatenates the past itself"


@pytest.mark.parametrize("dtype,cache,ops", [("float32", "append", {"MultiHeadAttention"}),
                                             ("float16", "in_place", {"GroupQueryAttention", "MultiHeadAttention"})])
def test_a_gpu_graph_uses_only_attention_ops_with_cuda_kernels_for_its_dtype(decoder, dtype, cache, ops):
    """onnxruntime registers GroupQueryAttention on CUDA for fp16/bf16 only
    (contrib_ops/cuda/bert/group_query_attention.cc, REGISTER_KERNEL_TYPED(MLFloat16, ...) and
    (BFloat16, ...)); in an fp32 graph it would fall back to the CPU with a device copy per layer
    per step. MultiHeadAttention is registered for float and float16 on CUDA
    (contrib_ops/cuda/bert/multihead_attention.cc, REGISTER_KERNEL_TYPED(float, float) ...)."""
    assert cache_mode_for("gpu", dtype) == cache
    got = attention_op_counts(build_decoder_step(decoder, P, cache_mode_for("gpu", dtype), dtype))
    assert set(got) == ops, got


def test_exported_decode_loop_graph_is_fused_and_listed_in_the_report(exported_repo):
    repo, report = exported_repo
    m = onnx.load(str(repo / names.DECODE_LOOP / "1" / names.DECODER_GRAPH_FILE))
    ops = attention_op_counts(m)
    n_layers = report.dims.L
    assert ops == {"GroupQueryAttention": n_layers, "MultiHeadAttention": n_layers}, ops  # a cpu export
    assert report.kv_cache == "in_place"
    assert report.fusions[names.DECODE_LOOP]["GroupQueryAttention"] == n_layers
    assert report.fusions[names.DECODE_LOOP].get("SkipLayerNormalization", 0) >= 2 * n_layers


def test_a_repository_from_an_older_export_is_refused_with_the_fix(tmp_path):
    """decode_loop/<v>/decoder.onnx of an earlier export is the traced stacked-cache graph, with
    none of the step graph's metadata: the loop refuses it by name instead of binding it wrongly."""
    write_select_rows(tmp_path / "select.onnx")
    write_select_rows(tmp_path / "old-decoder.onnx")  # any graph without the metadata
    with pytest.raises(ValueError, match=r"old-decoder\.onnx is not a decode-loop step graph.*re-export"):
        BoundDecoder(tmp_path / "old-decoder.onnx", tmp_path / "select.onnx")


def test_int8_and_an_fp16_decoder_are_refused_together_before_anything_is_written(tmp_path):
    from captioner.export.exporter import export

    with pytest.raises(ValueError, match="--quantize int8 .* --decoder-dtype float16"):
        export(str(tmp_path / "missing.pt"), str(tmp_path / "repo"), quantize="int8", decoder_dtype="float16")
    assert not (tmp_path / "repo").exists()
