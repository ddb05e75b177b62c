"""`captioner export`: a checkpoint to a Triton model repository."""
from __future__ import annotations

from captioner.cli.args import POSITIVE


def cmd_export(a, _):
    from captioner.export.exporter import export

    r = export(a.checkpoint, a.out, device=a.device, quantize=a.quantize, verify=not a.no_verify,
               parity_images=a.parity_images, optimize=not a.no_optimize, force=a.force,
               decoder_dtype=a.decoder_dtype)
    if r.parity is not None:
        p = r.parity
        print(f"parity: encoder max|diff| {p.encoder_max_abs_diff:.2e}, per-step logits max|diff| "
              f"{p.logits_max_abs_diff:.2e}, decode loop ({r.decoder_dtype}, cache {r.kv_cache}) log-probs "
              f"max|diff| {p.loop_logprobs_max_abs_diff:.2e}, greedy captions equal "
              f"{p.captions_equal}/{p.images}")
    for kind, q in r.quantized_parity().items():
        print(f"{kind} parity: logits max|diff| {q.logits_max_abs_diff:.3f}, decode loop log-probs max|diff| "
              f"{q.loop_logprobs_max_abs_diff:.3f}, greedy captions equal {q.captions_equal}/{q.images}")
    print(f"wrote Triton model repository {a.out}")


def add_export(sub, common: dict) -> None:
    s = sub.add_parser("export", **common,
                       help="checkpoint -> Triton model repository (ONNX + Python backend + ensemble)",
                       description="Export encoder and decoder (with past key/values) to ONNX, write the Triton "
                                   "repository and verify onnxruntime against PyTorch (fails loudly on mismatch).")
    s.add_argument("checkpoint", help="checkpoint file or run folder")
    s.add_argument("--out", required=True,
                   help="repository folder: new, empty, or one written earlier by export (replaced atomically)")
    s.add_argument("--force", action="store_true",
                   help="replace --out even if it holds other files (they are deleted)")
    s.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                   help="instance kind in the ONNX models' configs (KIND_GPU for the cluster, KIND_CPU locally)")
    s.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="int8: onnxruntime dynamic int8 (every graph, per-channel weights); int4: the decode loop's "
                        "step graph 4-bit weight-only (MatMulNBits, block 32), the encoder int8")
    s.add_argument("--decoder-dtype", choices=["float32", "float16"], default="float32",
                   help="the decode loop's step graph: float16 (for GPUs) halves its bytes per step and keeps "
                        "the KV cache in place on the GPU too (GroupQueryAttention has CUDA kernels for fp16 "
                        "only); its captions may differ from PyTorch's at near-ties (reported)")
    s.add_argument("--no-verify", action="store_true", help="skip the onnxruntime/PyTorch parity check")
    s.add_argument("--no-optimize", action="store_true", help="skip onnxruntime's transformer graph fusions")
    s.add_argument("--parity-images", type=POSITIVE, default=8, help="images in the parity check")
    s.set_defaults(fn=cmd_export)
