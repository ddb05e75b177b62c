"""`captioner serve` as a real process, driven by tritonclient.grpc."""
import io
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from captioner.core import names
from captioner.data.samples import sample_images
from captioner.modeling.checkpoint import load_checkpoint
from captioner.modeling.inference import caption_tensor
from captioner.serving.client import caption_bytes, caption_files
from captioner.serving.core import image_bytes_to_pixels
from tests.helpers import start_serve


def test_health_metadata_and_config(server, exported_repo):
    url = server.grpc
    c = grpcclient.InferenceServerClient(url)
    assert c.is_server_live() and c.is_server_ready()
    for m in (names.ENSEMBLE, names.ENCODER, names.DECODER):
        assert c.is_model_ready(m)
    md = c.get_model_metadata(names.ENSEMBLE)
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs][0] == (names.IMAGE, "BYTES", [-1, 1])
    assert [(t.name, t.datatype) for t in md.outputs] == [(names.CAPTION, "BYTES")]
    cfg = c.get_model_config(names.DECODER).config
    assert cfg.name == names.DECODER and cfg.backend == "onnxruntime"
    assert [t.name for t in cfg.input] == [names.INPUT_IDS, names.CROSS_KV, names.PAST_KV]
    enc = c.get_model_metadata(names.ENCODER)
    assert enc.platform == "onnxruntime_onnx" and enc.inputs[0].name == names.PIXEL_VALUES


def test_captions_equal_pytorch_greedy(server, trained_run):
    url = server.grpc
    ck = load_checkpoint(trained_run.out_dir)
    imgs = [b for _, b in sample_images(ck.config.data, 6)]
    pixels = torch.from_numpy(image_bytes_to_pixels(np.array(imgs, dtype=object), ck.preprocess))
    want = caption_tensor(ck.model, ck.tokenizer, pixels)
    assert caption_bytes(url, imgs) == want  # one batched request
    assert [caption_bytes(url, [b])[0] for b in imgs] == want  # one request per image
    beam = caption_bytes(url, imgs[:2], beam=3)
    assert len(beam) == 2 and all(isinstance(b, str) for b in beam)


def test_encoder_and_decoder_are_served_directly(server, trained_run):
    url = server.grpc
    ck = load_checkpoint(trained_run.out_dir)
    imgs = [b for _, b in sample_images(ck.config.data, 2)]
    x = image_bytes_to_pixels(np.array(imgs, dtype=object), ck.preprocess)
    c = grpcclient.InferenceServerClient(url)
    i = grpcclient.InferInput(names.PIXEL_VALUES, list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    cross = c.infer(names.ENCODER, [i]).as_numpy(names.CROSS_KV)
    with torch.no_grad():
        _, want = ck.model.encode_for_decoding(torch.from_numpy(x))
    np.testing.assert_allclose(cross, want.numpy(), atol=1e-4)


def test_200_requests_at_concurrency_16_without_errors(server, trained_run):
    url = server.grpc
    ck = load_checkpoint(trained_run.out_dir)
    imgs = [b for _, b in sample_images(ck.config.data, 8)]
    expected = {}
    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(lambda k: (k % 8, caption_bytes(url, [imgs[k % 8]])[0]), range(200)))
    for k, cap in results:
        expected.setdefault(k, cap)
        assert cap == expected[k], "the same image must get the same caption under load"
    assert len(results) == 200
    # concurrent requests were batched: fewer batched executions than inferences
    st = grpcclient.InferenceServerClient(url).get_inference_statistics(names.ENSEMBLE).model_stats[0]
    assert st.inference_count >= 200 and st.execution_count < st.inference_count, st


def _infer_raw(url, model, inputs):
    c = grpcclient.InferenceServerClient(url)
    return c.infer(model, inputs)


def _image_input(data):
    arr = np.array([[data]], dtype=object)
    i = grpcclient.InferInput(names.IMAGE, [1, 1], "BYTES")
    i.set_data_from_numpy(arr)
    return i


def _png(w, h):
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case,needle,code", [
    ("empty", "empty image data", "INVALID_ARGUMENT"),
    ("random", "not a recognised image format", "INVALID_ARGUMENT"),
    ("truncated", "cannot decode image", "INVALID_ARGUMENT"),
    ("huge", "megapixels, over the limit", "INVALID_ARGUMENT"),
    ("dtype", "datatype FP32, expected BYTES", "INVALID_ARGUMENT"),
    ("shape", "has shape [1, 2], expected [-1, 1]", "INVALID_ARGUMENT"),
    ("decoder-shape", "input 'cross_kv' has shape", "INVALID_ARGUMENT"),
    ("unknown-model", "Request for unknown model: 'nope' is not found", "NOT_FOUND"),
    ("missing-input", "missing required input(s): IMAGE", "INVALID_ARGUMENT"),
])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(server, trained_run, case, needle, code):
    url, proc = server.grpc, server.proc
    ck = load_checkpoint(trained_run.out_dir)
    good = sample_images(ck.config.data, 1)[0][1]
    model, inputs = names.ENSEMBLE, None
    if case == "empty":
        inputs = [_image_input(b"")]
    elif case == "random":
        inputs = [_image_input(np.random.default_rng(0).bytes(5000))]
    elif case == "truncated":
        inputs = [_image_input(good[: len(good) // 2])]
    elif case == "huge":
        inputs = [_image_input(_png(10000, 10000))]  # 100 megapixels
    elif case == "dtype":
        i = grpcclient.InferInput(names.IMAGE, [1, 1], "FP32")
        i.set_data_from_numpy(np.zeros((1, 1), np.float32))
        inputs = [i]
    elif case == "shape":
        i = grpcclient.InferInput(names.IMAGE, [1, 2], "BYTES")
        i.set_data_from_numpy(np.array([[good, good]], dtype=object))
        inputs = [i]
    elif case == "decoder-shape":
        model = names.DECODER
        ids = grpcclient.InferInput(names.INPUT_IDS, [1, 1], "INT64")
        ids.set_data_from_numpy(np.ones((1, 1), np.int64))
        cr = grpcclient.InferInput(names.CROSS_KV, [1, 3, 3], "FP32")
        cr.set_data_from_numpy(np.zeros((1, 3, 3), np.float32))
        inputs = [ids, cr]
    elif case == "unknown-model":
        model, inputs = "nope", [_image_input(good)]
    elif case == "missing-input":
        b = grpcclient.InferInput(names.BEAM_SIZE, [1, 1], "INT32")
        b.set_data_from_numpy(np.ones((1, 1), np.int32))
        inputs = [b]
    with pytest.raises(InferenceServerException) as ei:
        _infer_raw(url, model, inputs)
    assert code in str(ei.value.status()), ei.value
    assert needle in ei.value.message(), ei.value.message()
    assert proc.poll() is None
    assert caption_bytes(url, [good])[0]  # still serving


def test_caption_cli_against_server(server, synth_dir, tmp_path):
    url = server.grpc
    imgs = sorted((synth_dir / "flickr30k_images").glob("*.jpg"))[:3]
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"\x00\x01")
    out = dict(caption_files(url, [str(p) for p in imgs] + [str(bad)], concurrency=4))
    assert all(out[str(p)] and not out[str(p)].startswith("ERROR") for p in imgs)
    assert out[str(bad)].startswith("ERROR:") and "not a recognised image format" in out[str(bad)]
    r = subprocess.run([sys.executable, "-m", "captioner", "caption", *map(str, imgs), "--url", url, "--beam", "2"],
                       capture_output=True, text=True, env=os.environ.copy())
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 3


def test_sigterm_stops_cleanly(exported_repo, tmp_path):
    repo, _ = exported_repo
    p, _ = start_serve(repo, tmp_path / "serve.log")
    p.send_signal(signal.SIGTERM)
    t0 = time.time()
    p.wait(timeout=30)
    out = (tmp_path / "serve.log").read_text()
    assert p.returncode == 0, out
    assert "server stopped cleanly" in out and time.time() - t0 < 15
