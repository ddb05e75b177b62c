"""Torch-free foundations every stage shares: tensor and model names, errors, deployment constants,
serving limits, the experiment config, image preprocessing, the tokenizer and the decoders. What the
Triton Python models run. Imports nothing of captioner outside core."""
