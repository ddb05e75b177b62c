"""Fused attention in the exported encoder graph (timm ViT attention as MultiHeadAttention).

onnxruntime's transformer optimizer does not recognise the attention subgraph that the
TorchScript exporter writes for a timm ViT (it fuses LayerNorm, SkipLayerNorm and Gelu only),
so `fused_vit_attention` makes the exporter write attention directly as one
`com.microsoft.MultiHeadAttention` node per block: during `torch.onnx.export(..., dynamo=False)`
each plain timm `Attention` module runs a forward whose attention core is an autograd Function
with an ONNX symbolic. PyTorch numerics stay the reference (the Function's forward is the same
scaled-dot-product attention, scale head_dim**-0.5, which is also MultiHeadAttention's default).

MultiHeadAttention (onnxruntime/core/graph/contrib_ops/bert_defs.cc: query/key/value
[B, S, hidden], attribute num_heads, optional bias/mask/past inputs left out here) has CPU and
CUDA fp32/fp16 kernels in onnxruntime 1.19.2 (Triton 24.10's, deployment.TRITON_ONNXRUNTIME) and
later; the exported graph is run in that release by tests/serving/test_triton_onnxruntime.py.
"""
from __future__ import annotations

import contextlib
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class _MultiHeadAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(head_dim)) v over `num_heads` heads; q, k, v [B, S, hidden].
    Exported as one com.microsoft.MultiHeadAttention node."""

    @staticmethod
    def forward(ctx, q, k, v, num_heads: int):
        B, S, D = q.shape

        def heads(t):
            return t.reshape(B, t.shape[1], num_heads, D // num_heads).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return o.transpose(1, 2).reshape(B, S, D)

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=num_heads)
        out.setType(q.type())  # same shape and dtype as the query
        return out


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    return _MultiHeadAttention.apply(q, k, v, num_heads)


def _fused_forward(self, x, attn_mask=None, is_causal=False):
    """timm Attention.forward for the plain form (no q/k norm, no scale norm, no gate)."""
    if attn_mask is not None or is_causal:  # not what MultiHeadAttention is given here
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    q, k, v = self.qkv(x).chunk(3, dim=-1)  # qkv's output is laid out [3, heads, head_dim]
    x = multi_head_attention(q, k, v, self.num_heads)
    return self.proj_drop(self.proj(x))


def why_not_fusable(m: nn.Module) -> str | None:
    """None when `m` is a timm Attention in the plain form `_fused_forward` reproduces, else why not."""
    from timm.layers import Attention

    if type(m) is not Attention:
        return f"{type(m).__name__} is not timm.layers.Attention"
    for name in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(m, name, None), nn.Identity):
            return f"{name} is {type(getattr(m, name, None)).__name__}, not Identity"
    if getattr(m, "gate", None) is not None:
        return "gated attention output"
    if m.num_heads * m.head_dim != m.attn_dim or m.qkv.out_features != 3 * m.attn_dim:
        return "qkv width is not 3 x num_heads x head_dim"
    if m.training and m.attn_drop.p > 0:
        return "attention dropout in training mode"
    return None


@contextlib.contextmanager
def fused_vit_attention(model: nn.Module):
    """Within the block, every plain timm Attention under `model` runs `_fused_forward` (so an
    ONNX export writes MultiHeadAttention). Yields the names of the patched modules; attention
    modules left as they are get one log line each. The original forwards come back on exit,
    also on error."""
    patched, skipped = [], []
    for name, m in model.named_modules():
        if "Attention" not in type(m).__name__ and not hasattr(m, "qkv"):
            continue
        reason = why_not_fusable(m)
        if reason:
            skipped.append((name, reason))
            continue
        if "forward" in vars(m):  # already patched on the instance: leave it alone
            skipped.append((name, "forward already replaced on the instance"))
            continue
        m.forward = types.MethodType(_fused_forward, m)
        patched.append(name)
    for name, reason in skipped:
        log.info("attention %s left unfused in the ONNX graph: %s", name or "(root)", reason)
    try:
        yield patched
    finally:
        for name in patched:
            del model.get_submodule(name).forward
