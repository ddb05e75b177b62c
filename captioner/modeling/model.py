"""ViT encoder (any timm model) + pre-LN Transformer decoder with cross-attention and an
explicit KV cache.

No file I/O here (timm may fetch pretrained weights when asked to; see `build_encoder`).
Shapes: B images, N caption rows (N >= B: every image brings all of its captions),
P patch tokens, T caption tokens, D = d_model, H heads, Dh = D // H, L decoder layers.

The decoding state is two stacked, batch-first tensors so that PyTorch, onnxruntime and
Triton all pass the same things around:
  cross_kv [B, 2L, H, P, Dh]  computed once per image (`encode_for_decoding`)
  past_kv  [B, 2L, H, T', Dh] grows by one position per generated token (`decode_step`)
Row 2i holds layer i's keys, row 2i+1 its values.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from captioner.core.errors import WeightsUnavailableError
from captioner.modeling.encoders import check_encoder


@dataclass
class ModelConfig:
    # Any timm model name. ViTs give patch tokens; CNN feature maps are flattened.
    encoder: str = "vit_base_patch16_224"
    # ImageNet weights help a lot on real photos; the Hub must be reachable or
    # `encoder_weights` must name a local file.
    pretrained: bool = False
    # Local weights file (.safetensors/.pth/.bin) for the encoder; implies pretrained.
    encoder_weights: str = ""
    # Extra timm.create_model kwargs (img_size, patch_size, depth, embed_dim, ...).
    encoder_kwargs: dict = field(default_factory=dict)
    # Freeze the encoder (linear-probe style) when data is tiny and weights are good.
    freeze_encoder: bool = False
    # Decoder width; 512 is the usual small captioner width, a tenth of the encoder FLOPs.
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    mlp_ratio: float = 4.0
    # Captions are short and datasets small: dropout is the main regulariser.
    dropout: float = 0.1
    # Maximum caption length in tokens, BOS and EOS included (Flickr30k: 95% under 30 words).
    max_len: int = 32
    # Filled from the trained tokenizer; 0 means "not set yet".
    vocab_size: int = 0
    pad_id: int = 0

    @property
    def max_new_tokens(self) -> int:
        """Longest caption the model was trained to produce: max_len minus BOS and EOS."""
        return self.max_len - 2


# ---------------------------------------------------------------------------------------
def build_encoder(cfg: ModelConfig) -> nn.Module:
    import timm  # slow to import: only when an encoder is built

    check_encoder(cfg.encoder, cfg.pretrained, cfg.encoder_weights)  # a clear error now, not timm's later
    kwargs = dict(cfg.encoder_kwargs)
    kwargs["num_classes"] = 0
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", {}) or {})
    if "img_size" in kwargs:  # keep the encoder's data config truthful about its input size
        s = kwargs["img_size"]
        overlay["input_size"] = (3, s, s) if isinstance(s, int) else (3, *s)
    pretrained = cfg.pretrained or bool(cfg.encoder_weights)
    if cfg.encoder_weights:
        overlay["file"] = cfg.encoder_weights
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        return timm.create_model(cfg.encoder, pretrained=pretrained, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix in the message
        if not pretrained:
            raise
        raise WeightsUnavailableError(
            f"could not load pretrained weights for timm encoder '{cfg.encoder}': {type(e).__name__}: {e}\n"
            "Either make the Hugging Face Hub reachable (or point HF_HUB_CACHE at a cache that holds "
            "the weights), or download the weights file elsewhere and pass "
            "--model.encoder_weights=/path/to/model.safetensors, or train from scratch with "
            "--model.pretrained=false."
        ) from e


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = build_encoder(cfg)
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0))
        self.proj = nn.Linear(self.backbone.num_features, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)
        # CNN feature maps carry no position once flattened and cross-attention is
        # permutation-invariant, so give their tokens a learned position embedding.
        # (ViTs add their own inside the backbone.)
        self.pos = None
        size = self.backbone.pretrained_cfg.get("input_size", (3, 224, 224))
        with torch.no_grad():
            f = self.backbone.forward_features(torch.zeros(1, *size))
        if f.ndim == 4:
            self.pos = nn.Parameter(torch.zeros(1, f.shape[2] * f.shape[3], cfg.d_model))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_features(images)
        if f.ndim == 4:  # CNN: [B, C, h, w] -> [B, h*w, C]
            return f.flatten(2).transpose(1, 2)
        return f[:, self.num_prefix_tokens:]  # ViT: drop cls/register tokens -> [B, P, C]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.forward_features(images))  # [B, P, D]
        if self.pos is not None:
            x = x + self.pos
        return self.norm(x)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.d_model * cfg.mlp_ratio)
        self.fc = nn.Linear(cfg.d_model, hidden)
        self.proj = nn.Linear(hidden, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.self_proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D)
        self.q_cross = nn.Linear(D, D)
        self.kv_cross = nn.Linear(D, 2 * D)
        self.cross_proj = nn.Linear(D, D)
        self.ln3 = nn.LayerNorm(D)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.p_attn = cfg.dropout

    def _heads(self, x):  # [B, T, D] -> [B, H, T, Dh]
        B, T, D = x.shape
        return x.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)

    def _merge(self, x):  # [B, H, T, Dh] -> [B, T, D]
        B, H, T, Dh = x.shape
        return x.transpose(1, 2).reshape(B, T, H * Dh)

    def cross_kv(self, memory: torch.Tensor):
        k, v = self.kv_cross(memory).chunk(2, dim=-1)  # [B, P, D] each
        return self._heads(k), self._heads(v)  # [B, H, P, Dh]

    def forward(self, x, cross_k, cross_v, past_k=None, past_v=None):
        """x [B,T,D]; cross_k/v [B,H,P,Dh]; past_k/v [B,H,T',Dh] or None.
        Returns x [B,T,D] and this layer's present k, v [B,H,T'+T,Dh]."""
        p = self.p_attn if self.training else 0.0
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if past_k is None:
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
            T, S = q.shape[2], k.shape[2]
            # query i sits at absolute position S - T + i and may see keys 0..S-T+i
            qpos = torch.arange(T, device=x.device)[:, None] + (S - T)
            mask = torch.arange(S, device=x.device)[None, :] <= qpos  # [T, S]
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + self.drop(self.self_proj(self._merge(a)))
        qc = self._heads(self.q_cross(self.ln2(x)))
        c = F.scaled_dot_product_attention(qc, cross_k, cross_v, dropout_p=p)
        x = x + self.drop(self.cross_proj(self._merge(c)))
        x = x + self.mlp(self.ln3(x))
        return x, k, v


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "ModelConfig.vocab_size must be set from the tokenizer"
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied input/output embeddings

    def cross_kv(self, memory: torch.Tensor) -> torch.Tensor:
        """memory [B,P,D] -> cross_kv [B, 2L, H, P, Dh]."""
        kvs = []
        for blk in self.blocks:
            k, v = blk.cross_kv(memory)
            kvs += [k, v]
        return torch.stack(kvs, dim=1)

    def forward(self, tokens, cross_kv, past_kv=None):
        """tokens [B,T]; cross_kv [B,2L,H,P,Dh]; past_kv [B,2L,H,T',Dh] or None.
        Returns logits [B,T,V] and present_kv [B,2L,H,T'+T,Dh]."""
        T = tokens.shape[1]
        start = 0 if past_kv is None else past_kv.shape[3]
        pos = torch.arange(start, start + T, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(pos))
        present = []
        for i, blk in enumerate(self.blocks):
            pk = pv = None
            if past_kv is not None:
                pk, pv = past_kv[:, 2 * i], past_kv[:, 2 * i + 1]
            x, k, v = blk(x, cross_kv[:, 2 * i], cross_kv[:, 2 * i + 1], pk, pv)
            present += [k, v]
        return self.head(self.ln_f(x)), torch.stack(present, dim=1)


class Captioner(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ImageEncoder(cfg)
        self.decoder = CaptionDecoder(cfg)
        self._init_decoder()
        if cfg.freeze_encoder:
            self.encoder.backbone.requires_grad_(False)

    def _init_decoder(self):
        if self.encoder.pos is not None:
            nn.init.normal_(self.encoder.pos, std=0.02)
        for m in list(self.decoder.modules()) + [self.encoder.proj]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)  # [B,3,H,W] -> [B,P,D]

    def encode_for_decoding(self, images: torch.Tensor):
        """What the encoder ONNX model computes: memory [B,P,D] and cross_kv [B,2L,H,P,Dh]."""
        memory = self.encode(images)
        return memory, self.decoder.cross_kv(memory)

    def decode_step(self, tokens, cross_kv, past_kv=None):
        """One or more new tokens [B,T] against the cache -> (logits [B,T,V], present_kv)."""
        return self.decoder(tokens, cross_kv, past_kv)

    def forward(self, images, tokens, image_index=None, label_smoothing: float = 0.0):
        """images [B,3,H,W]; tokens [N,T] = BOS w1 .. wk EOS PAD..; image_index [N] maps
        caption rows to images (None: row i belongs to image i). Each image is encoded
        once however many captions it has. Returns (logits [N,T-1,V], loss)."""
        memory = self.encode(images)  # [B,P,D]
        cross = self.decoder.cross_kv(memory)  # [B,2L,H,P,Dh], once per image
        if image_index is not None:
            cross = cross[image_index]  # [N,2L,H,P,Dh]
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        logits, _ = self.decoder(inp, cross)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), tgt.reshape(-1),
            ignore_index=self.cfg.pad_id, label_smoothing=label_smoothing,
        )
        return logits, loss


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
