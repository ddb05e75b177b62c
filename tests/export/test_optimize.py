"""`captioner export --quantize int4`: the decode loop's step graph with every MatMul (the
vocabulary projection included) as com.microsoft.MatMulNBits (4-bit block-wise weights), the
encoder in int8, and log-probs close to PyTorch's through the served BoundDecoder."""
import numpy as np
import onnx
import pytest
import torch

from captioner.core.decoding import DecodeParams, log_softmax
from captioner.core.names import DECODE_LOOP, DECODER, DECODER_GRAPH_FILE, ENCODER, LOGITS
from captioner.data.samples import sample_images
from captioner.export.graphs import op_type_counts, step_weight_bytes
from captioner.export.optimize import INT4_BLOCK_SIZE
from captioner.modeling.checkpoint import load_checkpoint
from captioner.modeling.inference import caption_tensor
from captioner.serving.core import DecodeLoop, image_bytes_to_pixels

# Teacher-forced log-probs of the 4-bit step graph vs PyTorch fp32, max over every position,
# row and vocabulary entry. Round-to-nearest 4-bit with a block of 32 input rows per scale
# leaves each weight off by up to scale/2 = (max - min of its block) / 30 (symmetric blocks:
# max|w| / 14), about 5-10% of a weight's spread (RMS) for bell-shaped weights; the errors of a
# row's products add up incoherently, so each MatMul output is off by roughly that share of its
# own spread, and the logits (a few nats apart) move by tenths of a nat: measured 0.31 and 0.32
# (symmetric blocks) on the demo's checkpoint after one and three epochs (8 and 4 images). The
# same quantizer at 2 bits moved them by 1.75 (top-1 still 45/48); a graph that is wrong rather
# than rounded (a weight transposed, blocks packed along the wrong axis) scrambles the products
# further.
INT4_LOGPROB_ATOL = 1.0


def _step_graph(repo):
    return onnx.load(str(repo / DECODE_LOOP / "1" / DECODER_GRAPH_FILE))


def test_every_step_graph_matmul_is_4bit_vocabulary_projection_included(int4_repo, trained_run):
    repo, report = int4_repo
    g = _step_graph(repo)
    c = load_checkpoint(trained_run.out_dir).model.cfg
    counts = op_type_counts(g)
    # per block: qkv, self-attention out, cross query, cross-attention out, MLP in and out; then the head
    assert counts["MatMul"] == 0 and counts["MatMulNBits"] == 6 * c.n_layers + 1, counts
    assert report.step_graph_int4 == {"MatMul": 0, "MatMulNBits": 6 * c.n_layers + 1}
    head = next(n for n in g.graph.node if LOGITS in n.output)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    assert head.op_type == "MatMulNBits" and head.domain == "com.microsoft"
    assert (attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"]) == (4, INT4_BLOCK_SIZE, c.d_model,
                                                                             c.vocab_size)


def test_int4_repository_ships_quantized_graphs_only(int4_repo, exported_repo):
    repo, _ = int4_repo
    fp32 = exported_repo[0]
    # no fp32 copy beside the quantized graphs (Triton downloads a model's whole folder)
    assert sorted(p.relative_to(repo) for p in repo.rglob("*.onnx*")) == \
        sorted(p.relative_to(fp32) for p in fp32.rglob("*.onnx*"))
    # int8 as --quantize int8 writes them: the encoder's weight MatMuls and the traced decoder's
    # become integer MatMuls (the decoder's attention MatMuls multiply activations, and stay)
    assert op_type_counts(repo / ENCODER / "1" / "model.onnx")["MatMul"] == 0
    for name in (ENCODER, DECODER):
        c = op_type_counts(repo / name / "1" / "model.onnx")
        assert c["MatMulInteger"] + c["DynamicQuantizeMatMul"] > 0, (name, c)
    # a step reads 4.5 bits per weight (4 + a 32-bit scale per 32) instead of 32, plus the
    # fp32 biases and LayerNorm parameters
    ratio = step_weight_bytes(repo / DECODE_LOOP / "1" / DECODER_GRAPH_FILE) / \
        step_weight_bytes(fp32 / DECODE_LOOP / "1" / DECODER_GRAPH_FILE)
    assert ratio < 0.2, ratio


def test_int4_step_graph_log_probs_match_pytorch(int4_repo, trained_run):
    """The step graph fed PyTorch's cross K/V (so only the decoder's 4-bit weights differ),
    teacher-forced on PyTorch's greedy captions, through the served BoundDecoder."""
    repo, _ = int4_repo
    ck = load_checkpoint(trained_run.out_dir)
    m = ck.model.eval()
    images = [b for _, b in sample_images(ck.config.data, 4)]
    pixels = image_bytes_to_pixels(np.array(images, dtype=object), ck.preprocess)
    x = torch.from_numpy(pixels)
    with torch.no_grad():
        _, cross = m.encode_for_decoding(x)
    caps = caption_tensor(m, ck.tokenizer, x, DecodeParams(max_new_tokens=m.cfg.max_new_tokens))
    ids = [[ck.tokenizer.bos_id] + ck.tokenizer.encode(c, m.cfg.max_len)[1:-1] for c in caps]
    T = min(len(s) for s in ids)
    tokens = np.array([s[:T] for s in ids], np.int64)
    step = DecodeLoop.in_process(repo / DECODE_LOOP / "1").make_step(cross.numpy())
    past, worst, same = None, 0.0, 0
    for t in range(T):
        got = step(tokens[:, t])
        with torch.no_grad():
            logits, past = m.decode_step(torch.from_numpy(tokens[:, t:t + 1]), cross, past)
        want = log_softmax(logits[:, -1].numpy())
        worst = max(worst, float(np.abs(got - want).max()))
        same += int((got.argmax(-1) == want.argmax(-1)).sum())
    assert worst <= INT4_LOGPROB_ATOL, worst
    assert worst > 0  # 4-bit weights, not the fp32 graph
    assert same >= 0.8 * tokens.size, (same, tokens.size)


def test_export_refuses_an_unknown_quantization_before_anything_is_written(tmp_path):
    from captioner.export.exporter import export

    with pytest.raises(ValueError, match="--quantize must be one of int8, int4, got 'int3'"):
        export(str(tmp_path / "missing.pt"), str(tmp_path / "repo"), quantize="int3")
    assert not (tmp_path / "repo").exists()
