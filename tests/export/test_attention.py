"""Attention in the exported encoder graph is fused: one com.microsoft.MultiHeadAttention
node per ViT block instead of the MatMul/Softmax decomposition (onnxruntime's transformer
optimizer does not fuse timm's attention subgraph), the export report lists it per graph, the
numbers still match PyTorch, and the int8 path keeps it."""
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from captioner.core.config import ModelConfig
from captioner.core.names import ENCODER
from captioner.modeling.checkpoint import load_checkpoint
from captioner.modeling.model import Captioner

VIT = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2)


def op_counts(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def vit_model(depth: int) -> Captioner:
    torch.manual_seed(0)
    return Captioner(ModelConfig(encoder="vit_tiny_patch16_224", d_model=32, n_layers=1, n_heads=2, max_len=12,
                                 vocab_size=40, encoder_kwargs=dict(VIT, depth=depth))).eval()


@pytest.fixture(scope="module", params=["exported-repository", "depth-2", "depth-3"])
def encoder_graph(request, tmp_path_factory):
    """(path of an encoder graph, ViT depth, model): the session's exported (and optimised)
    repository, and bare encoder exports of random ViTs of other depths."""
    if request.param == "exported-repository":
        repo, _ = request.getfixturevalue("exported_repo")
        m = load_checkpoint(request.getfixturevalue("trained_run").out_dir).model.eval()
        return repo / ENCODER / "1" / "model.onnx", len(m.encoder.backbone.blocks), m
    from captioner.export.torch_graphs import export_encoder_graph

    depth = int(request.param.split("-")[1])
    m = vit_model(depth)
    f = tmp_path_factory.mktemp("enc") / "encoder.onnx"
    export_encoder_graph(m, (3, 32, 32), f)
    return f, depth, m


def test_encoder_graph_has_one_multihead_attention_per_block(encoder_graph):
    path, depth, _ = encoder_graph
    assert op_counts(path)["MultiHeadAttention"] == depth


def test_encoder_graph_has_no_unfused_softmax(encoder_graph):
    path, _, _ = encoder_graph
    assert op_counts(path)["Softmax"] == 0


def test_encoder_graph_matches_pytorch(encoder_graph):
    path, _, m = encoder_graph
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        hidden, cross = m.encode_for_decoding(x)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x.numpy()})
    np.testing.assert_allclose(got[0], hidden.numpy(), atol=1e-4)
    np.testing.assert_allclose(got[1], cross.numpy(), atol=1e-4)


def test_export_report_lists_fused_attention_per_graph(exported_repo, trained_run):
    repo, _ = exported_repo
    fusions = json.loads((repo / "export_report.json").read_text())["fusions"]
    depth = len(load_checkpoint(trained_run.out_dir).model.encoder.backbone.blocks)
    assert fusions[ENCODER]["MultiHeadAttention"] == depth


def test_export_report_fusions_are_what_the_graphs_hold(exported_repo):
    from captioner.export.graphs import FUSED_OP_TYPES

    repo, _ = exported_repo
    fusions = json.loads((repo / "export_report.json").read_text())["fusions"]
    on_disk = {k: v for k, v in op_counts(repo / ENCODER / "1" / "model.onnx").items() if k in FUSED_OP_TYPES}
    assert fusions[ENCODER] == on_disk


@pytest.mark.parametrize("key,bound", [("encoder_max_abs_diff", 1e-4), ("captions_unequal", 0)])
def test_parity_holds_with_fused_attention(exported_repo, key, bound):
    parity = json.loads((exported_repo[0] / "export_report.json").read_text())["parity"]
    parity["captions_unequal"] = parity["images"] - parity["captions_equal"]
    assert parity["images"] > 0 and parity[key] <= bound, parity


@pytest.fixture(scope="module")
def int8_repo(exported_repo, tmp_path_factory):
    from captioner.export.optimize import quantize_int8

    repo = tmp_path_factory.mktemp("int8") / "models"
    shutil.copytree(exported_repo[0], repo)
    quantize_int8(repo)
    return repo


def test_int8_repository_keeps_no_fp32_graph(int8_repo, exported_repo):
    """Triton copies a model's whole folder from S3: an fp32 copy beside the int8 graph would be
    downloaded for nothing (the decode loop's step graph is 229 MB at the seed shape)."""
    onnx_files = sorted(str(p.relative_to(int8_repo)) for p in int8_repo.rglob("*.onnx*"))
    assert onnx_files == sorted(str(p.relative_to(exported_repo[0])) for p in exported_repo[0].rglob("*.onnx*"))


@pytest.mark.parametrize("op,present", [("MultiHeadAttention", True), ("MatMul", False)])
def test_int8_encoder_keeps_attention_and_quantizes_matmuls(int8_repo, op, present):
    assert (op_counts(int8_repo / ENCODER / "1" / "model.onnx")[op] > 0) == present


def test_int8_parity_runs_on_the_fused_encoder(int8_repo, trained_run):
    from captioner.export.parity import ParityReport, check_parity

    rep = check_parity(load_checkpoint(trained_run.out_dir), int8_repo, 2, fail=False)
    assert isinstance(rep, ParityReport) and rep.images == 2 and np.isfinite(rep.encoder_max_abs_diff)


# ------------------------------------------------------------ the export-time patch itself
ATTENTION_KINDS = {
    "plain": (dict(), True),
    "qk_norm": (dict(qk_norm=True, norm_layer=torch.nn.LayerNorm), False),
    "scale_norm": (dict(scale_norm=True, norm_layer=torch.nn.LayerNorm), False),
    "gated": (dict(gated=True), False),
}


@pytest.mark.parametrize("kind", sorted(ATTENTION_KINDS))
def test_only_plain_timm_attention_is_fused(kind):
    from timm.layers import Attention

    from captioner.export.attention import fused_vit_attention

    kwargs, fusable = ATTENTION_KINDS[kind]
    block = torch.nn.Sequential(Attention(16, num_heads=2, qkv_bias=True, **kwargs)).eval()
    with fused_vit_attention(block) as fused:
        assert fused == (["0"] if fusable else [])


@pytest.mark.parametrize("kind", sorted(k for k, (_, fusable) in ATTENTION_KINDS.items() if not fusable))
def test_attention_left_unfused_is_named_in_the_log(kind, caplog):
    from timm.layers import Attention

    from captioner.export.attention import fused_vit_attention

    block = torch.nn.Sequential(Attention(16, num_heads=2, **ATTENTION_KINDS[kind][0])).eval()
    with caplog.at_level("INFO", logger="captioner.export.attention"), fused_vit_attention(block):
        pass
    assert any("attention 0 left unfused" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_fused_forward_equals_timm_forward(heads):
    from timm.layers import Attention

    from captioner.export.attention import fused_vit_attention

    torch.manual_seed(heads)
    attn, x = Attention(16, num_heads=heads, qkv_bias=True).eval(), torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = attn(x)
        with fused_vit_attention(attn) as fused:
            got = attn(x)
    assert fused == [""]
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_original_forward_comes_back_after_an_error():
    from captioner.export.attention import fused_vit_attention

    m = vit_model(2)
    with pytest.raises(RuntimeError, match="boom"), fused_vit_attention(m.encoder) as fused:
        assert len(fused) == 2
        raise RuntimeError("boom")
    assert not any("forward" in vars(b.attn) for b in m.encoder.backbone.blocks)


# ------------------------------------------------------------ a CNN encoder (the demo's)
def test_export_of_a_batchnorm_encoder_keeps_the_model_and_parity(tmp_path):
    """The demo's resnet10t encoder has BatchNorm: export must leave the model in eval mode
    and its running statistics untouched, or the parity check compares onnxruntime with a
    PyTorch model export itself changed. (Failed before: encoder max|diff| 0.79 in `make demo`:
    torch.onnx.export restored a fresh wrapper's training mode onto the model, and the next
    shape probe ran BatchNorm in training mode.)"""
    from captioner.bench.caption_latency import random_model, save_random
    from captioner.export.exporter import export

    torch.manual_seed(0)
    cfg, model, tok, pre = random_model("tiny-cpu", 40)
    with torch.no_grad():  # running statistics far from a zeros batch's, so a moved one shows
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 1)
                mod.running_var.uniform_(0.5, 2)
    ck = save_random(tmp_path, cfg, model, tok, pre)
    report = export(str(ck), str(tmp_path / "repo"), device="cpu", parity_images=2)  # raises ParityError
    assert report.parity.encoder_max_abs_diff < 1e-4
