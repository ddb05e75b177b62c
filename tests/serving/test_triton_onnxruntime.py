"""Defect 8: the exported graphs must run in the onnxruntime that the pinned Triton release
ships (captioner.deployment.TRITON_ONNXRUNTIME), not only in whatever this environment has.
A throwaway venv gets exactly that onnxruntime wheel; the encoder and decoder are run there
and compared with PyTorch. The encoder's attention is a com.microsoft.MultiHeadAttention
contrib op (captioner/onnx_attention.py), so this also checks that release has its kernel."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch

from captioner.checkpoint import load_checkpoint
from captioner.deployment import TRITON_ONNXRUNTIME, TRITON_RELEASE
from captioner.export import sample_images
from captioner.names import DECODER, ENCODER
from captioner.serving_core import image_bytes_to_pixels

RUN = textwrap.dedent("""
    import sys
    import numpy as np
    import onnxruntime as ort
    repo, io = sys.argv[1], sys.argv[2]
    x = dict(np.load(io + "/inputs.npz"))
    so = ort.SessionOptions()
    enc = ort.InferenceSession(repo + "/encoder/1/model.onnx", so, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(repo + "/decoder/1/model.onnx", so, providers=["CPUExecutionProvider"])
    hidden, cross = enc.run(None, {"pixel_values": x["pixel_values"]})
    logits, present = dec.run(None, {"input_ids": x["input_ids"], "cross_kv": cross, "past_kv": x["past_kv"]})
    np.savez(io + "/outputs.npz", hidden=hidden, cross=cross, logits=logits, present=present)
    print(ort.__version__)
""")


@pytest.fixture(scope="session")
def triton_ort_python(tmp_path_factory):
    venv = tmp_path_factory.mktemp("ort-triton") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"onnxruntime=={TRITON_ONNXRUNTIME}", "numpy<2.3"], capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0:
        pytest.skip(f"cannot install onnxruntime=={TRITON_ONNXRUNTIME} (Triton {TRITON_RELEASE}'s) for Python "
                    f"{sys.version_info.major}.{sys.version_info.minor}: {r.stderr.strip().splitlines()[-1:]}")
    return py


def test_exported_graphs_run_in_the_onnxruntime_triton_ships(exported_repo, trained_run, triton_ort_python, tmp_path):
    repo, report = exported_repo
    # the contrib op must be in the graph Triton's release runs, or this checks nothing about it
    assert "MultiHeadAttention" in {n.op_type for n in onnx.load(str(repo / ENCODER / "1" / "model.onnx")).graph.node}
    ck = load_checkpoint(trained_run.out_dir)
    pixels = image_bytes_to_pixels(np.array([b for _, b in sample_images(ck, 3)], dtype=object), ck.preprocess)
    m, c = ck.model.eval(), ck.model.cfg
    ids = np.array([[ck.tokenizer.bos_id]] * 3, np.int64)
    past = np.zeros((3, 2 * c.n_layers, c.n_heads, 0, c.d_model // c.n_heads), np.float32)
    np.savez(tmp_path / "inputs.npz", pixel_values=pixels, input_ids=ids, past_kv=past)
    r = subprocess.run([str(triton_ort_python), "-c", RUN, str(repo), str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == TRITON_ONNXRUNTIME
    got = np.load(tmp_path / "outputs.npz")
    with torch.no_grad():
        hidden, cross = m.encode_for_decoding(torch.from_numpy(pixels))
        logits, _ = m.decode_step(torch.from_numpy(ids), cross, None)
    np.testing.assert_allclose(got["hidden"], hidden.numpy(), atol=1e-3)
    np.testing.assert_allclose(got["cross"], cross.numpy(), atol=1e-3)
    np.testing.assert_allclose(got["logits"], logits.numpy(), atol=1e-2)


def test_export_report_records_ir_version_and_opsets(exported_repo):
    repo, report = exported_repo
    on_disk = json.loads((repo / "export_report.json").read_text())
    for name in (ENCODER, DECODER):
        info = on_disk["onnx"][name]
        assert info["ir_version"] >= 7 and info["opsets"]["ai.onnx"] >= 13
