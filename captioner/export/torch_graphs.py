"""The torch side of export: the encoder and decoder traced to ONNX (torch.onnx, weights
inline), the decode loop's step graph written from the weights (captioner.export.graphs) and
select_rows.onnx, and the graph dimensions every other repository file is sized by."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from captioner.core.names import (CROSS_KV, DECODE_LOOP, DECODER, DECODER_GRAPH_FILE, ENCODER, ENCODER_HIDDEN,
                                  INPUT_IDS, LOGITS, ONNX_MODEL_FILE, PAST_KV, PIXEL_VALUES, PRESENT_KV, ROWS,
                                  SELECT_ROWS_FILE, SELECTED, STATE)
from captioner.export.attention import fused_vit_attention
from captioner.export.graphs import DTYPES, build_decoder_step, cache_mode_for
from captioner.export.report import Dims
from captioner.modeling.checkpoint import LoadedCheckpoint

log = logging.getLogger(__name__)


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


def graph_dims(model, input_size: tuple[int, int, int]) -> Dims:
    """The dimensions of the graphs export writes for `model` on images of `input_size` (C, H, W):
    the encoder's positions P are counted by running it once."""
    m = model.eval()  # a BatchNorm in training mode would move its running statistics here
    c = m.cfg
    C, H, W = input_size
    with torch.no_grad():
        P = m.encode(torch.zeros(1, C, H, W)).shape[1]
    return Dims(C, H, W, P, c.d_model, c.n_layers, c.n_heads, c.d_model // c.n_heads, c.vocab_size)


def export_onnx(ck: LoadedCheckpoint, repo: Path, opset: int = 17) -> Dims:
    """Write encoder/1/model.onnx and decoder/1/model.onnx (weights inline). Dummy inputs
    use batch 2, 2 new tokens and 3 past positions so no dynamic axis is traced as 1."""
    d = graph_dims(ck.model, ck.preprocess.input_size)
    m = ck.model.eval()
    (repo / ENCODER / "1").mkdir(parents=True, exist_ok=True)
    (repo / DECODER / "1").mkdir(parents=True, exist_ok=True)
    export_encoder_graph(m, (d.C, d.H, d.W), repo / ENCODER / "1" / ONNX_MODEL_FILE, opset)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ids = torch.randint(4, d.V, (2, 2))
        cross = torch.randn(2, 2 * d.L, d.heads, d.P, d.Dh)
        past = torch.randn(2, 2 * d.L, d.heads, 3, d.Dh)
        torch.onnx.export(_DecoderGraph(m).eval(), (ids, cross, past), str(repo / DECODER / "1" / ONNX_MODEL_FILE),
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


