import pytest
import torch

from captioner.core.errors import WeightsUnavailableError
from captioner.core.preprocess import PreprocessConfig
from captioner.modeling.model import Captioner, ModelConfig

CONFIGS = {
    "vit": ModelConfig(encoder="vit_tiny_patch16_224", d_model=32, n_layers=2, n_heads=4, max_len=12, vocab_size=50,
                       encoder_kwargs=dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3)),
    "cnn": ModelConfig(encoder="resnet10t", d_model=24, n_layers=1, n_heads=2, max_len=10, vocab_size=30,
                       dropout=0.0),
}


@pytest.fixture(params=sorted(CONFIGS))
def model(request):
    torch.manual_seed(0)
    return Captioner(CONFIGS[request.param]).eval()


def _inputs(m, B=3, N=None):
    pre = PreprocessConfig.from_model(m.encoder.backbone)
    images = torch.randn(B, *pre.input_size)
    tokens = torch.randint(4, m.cfg.vocab_size, (N or B, m.cfg.max_len))
    return images, tokens


def test_forward_returns_logits_and_loss(model):
    images, tokens = _inputs(model)
    logits, loss = model(images, tokens)
    assert logits.shape == (3, model.cfg.max_len - 1, model.cfg.vocab_size)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.decoder.tok_emb.weight.grad is not None
    assert model.decoder.head.weight is model.decoder.tok_emb.weight  # tied


def test_kv_cache_steps_equal_full_sequence(model):
    images, tokens = _inputs(model)
    with torch.no_grad():
        _, cross = model.encode_for_decoding(images)
        full, _ = model.decode_step(tokens, cross)  # [B,T,V] in one pass
        past, steps = None, []
        for t in range(tokens.shape[1]):
            logits, past = model.decode_step(tokens[:, t:t + 1], cross, past)
            steps.append(logits)
        # and a chunked prefill followed by single steps
        l1, p = model.decode_step(tokens[:, :5], cross)
        l2, _ = model.decode_step(tokens[:, 5:7], cross, p)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([l1, l2], 1), full[:, :7], atol=1e-5, rtol=1e-4)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    assert past.shape[:4] == (3, 2 * L, H, tokens.shape[1])


def test_encode_once_per_image_equals_one_pass_per_pair(model):
    images, tokens = _inputs(model, B=2, N=5)
    index = torch.tensor([0, 0, 0, 1, 1])
    with torch.no_grad():
        grouped, loss_g = model(images, tokens, index)
        per_pair, loss_p = model(images[index], tokens)
    torch.testing.assert_close(grouped, per_pair, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss_g, loss_p, atol=1e-5, rtol=1e-4)


def test_preprocessing_comes_from_the_encoder(model):
    pre = PreprocessConfig.from_model(model.encoder.backbone)
    if model.cfg.encoder.startswith("vit"):
        assert pre.input_size == (3, 32, 32) and pre.mean == (0.5, 0.5, 0.5)
    else:
        assert pre.input_size[1] > 32 and pre.mean != (0.5, 0.5, 0.5)


def test_missing_pretrained_weights_say_how_to_fix(tmp_path):
    cfg = ModelConfig(encoder="vit_tiny_patch16_224", vocab_size=10, d_model=32, n_heads=2, n_layers=1,
                      encoder_weights=str(tmp_path / "nope.safetensors"))
    with pytest.raises(WeightsUnavailableError, match="--model.encoder_weights"):
        Captioner(cfg)


def test_local_encoder_weights_file_is_loaded(tmp_path):
    import timm
    from safetensors.torch import save_file

    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    src = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kw)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    cfg = ModelConfig(encoder="vit_tiny_patch16_224", vocab_size=10, d_model=32, n_heads=2, n_layers=1,
                      encoder_kwargs=kw, encoder_weights=str(tmp_path / "w.safetensors"))
    m = Captioner(cfg)
    torch.testing.assert_close(m.encoder.backbone.pos_embed, src.pos_embed)
