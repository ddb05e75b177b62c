"""The model (timm ViT encoder + Transformer decoder with a KV cache), PyTorch inference and the
checkpoint format. Imports core and io."""
