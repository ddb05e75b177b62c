"""The generation loop runs inside one execution of `decode_loop` (not one BLS call per token).

Triton users measure 2-13 ms per BLS `exec()` (server issues #5174, #7413), so a decode loop
that calls the `decoder` model once per token spends 40-260 ms per caption on round trips.
The pb_utils double counts BLS calls and the bytes they carry per request batch, and a
TransferMeter counts the host<->device bytes of the in-process onnxruntime session."""
import sys

import numpy as np
import pytest
import torch

from captioner.core import names
from captioner.data.samples import sample_images
from captioner.modeling.checkpoint import load_checkpoint
from captioner.modeling.inference import caption_tensor
from captioner.serving.core import DecodeSettings, image_bytes_to_pixels
from tests.helpers import load_model_py
from tests.serving import pb_utils_double


@pytest.fixture(scope="module")
def cross_and_want(trained_run):
    from captioner.core.decoding import DecodeParams

    ck = load_checkpoint(trained_run.out_dir)
    images = [b for _, b in sample_images(ck.config.data, 3)]
    pixels = torch.from_numpy(image_bytes_to_pixels(np.array(images, dtype=object), ck.preprocess))
    with torch.no_grad():
        _, cross = ck.model.encode_for_decoding(pixels)
    greedy = caption_tensor(ck.model, ck.tokenizer, pixels)
    beam = caption_tensor(ck.model, ck.tokenizer, pixels, DecodeParams(strategy="beam", beam_size=3,
                                                                         max_new_tokens=ck.model.cfg.max_new_tokens))
    return cross.numpy(), greedy, beam


def _captions(response):
    return [c.decode() for c in pb_utils_double.get_output_tensor_by_name(response, names.CAPTION).as_numpy().ravel()]


@pytest.mark.parametrize("beam", [1, 3])
def test_one_request_batch_makes_no_per_token_round_trips(exported_repo, cross_and_want, monkeypatch, beam):
    """At most one BLS exec() per request batch (zero per token); per step, only token ids go
    to the device and only the last position's logits come back: the cross K/V is bound once
    per caption and the KV cache never crosses."""
    repo, _ = exported_repo
    cross, greedy, want_beam = cross_and_want
    m = load_model_py(repo, names.DECODE_LOOP, monkeypatch)
    backend = sys.modules["triton_python_backend_utils"].backend
    meter = pb_utils_double.TransferMeter(monkeypatch)
    backend.reset_counts()
    R = pb_utils_double.FakeRequest
    out = m.execute([R(cross_kv=cross, BEAM_SIZE=np.full((len(cross), 1), beam, np.int32))])
    assert not out[0].has_error(), out[0].error().message()
    assert _captions(out[0]) == (greedy if beam == 1 else want_beam)  # decoding.py stays the reference
    assert len(backend.calls) <= 1, f"{len(backend.calls)} BLS exec() calls for one request batch"
    assert backend.bls_bytes == 0
    s = DecodeSettings.load(repo / names.DECODE_LOOP / "1")
    rows = len(cross) * beam
    vocab = load_checkpoint_vocab(repo)
    cross_bytes = cross.nbytes
    big = [b for b in meter.to_device if b > rows * 8]  # the cross K/V, one tensor per layer, once
    assert sum(big) == cross_bytes and len(big) == 2 * s.n_layers, \
        f"host->device transfers beyond token ids: {big} (cross K/V is {cross_bytes} B)"
    kv_step = rows * 2 * s.n_layers * s.n_heads * s.head_dim * 4  # one position of the cache
    assert meter.to_host and max(meter.to_host) <= rows * vocab * 4 < kv_step * s.max_new_tokens
    assert all(b <= rows * vocab * 4 for b in meter.to_host), "the KV cache came back to the host"


def load_checkpoint_vocab(repo):
    from captioner.serving.triton_repo import read_config

    cfg = read_config(repo / names.DECODER / "config.pbtxt")
    return next(o.dims[-1] for o in cfg.output if o.name == names.LOGITS)


@pytest.fixture(scope="module")
def fp16_repo(trained_run, tmp_path_factory):
    from captioner.export.exporter import export

    repo = tmp_path_factory.mktemp("fp16") / "models"
    export(str(trained_run.out_dir / "ckpt_best.pt"), str(repo), device="gpu", decoder_dtype="float16")
    return repo


@pytest.mark.parametrize("beam", [1, 3])
def test_decode_loop_model_runs_an_fp16_step_graph(fp16_repo, cross_and_want, monkeypatch, beam):
    """Triton's decode_loop model over an `--decoder-dtype float16` export: the fp32 cross K/V of
    the request is converted once, the fp16 cache stays in place, and the captions are the
    reference's (this model's log-probs are 4e-4 from PyTorch's, far from any near-tie)."""
    cross, greedy, want_beam = cross_and_want
    m = load_model_py(fp16_repo, names.DECODE_LOOP, monkeypatch)
    out = m.execute([pb_utils_double.FakeRequest(cross_kv=cross, BEAM_SIZE=np.full((len(cross), 1), beam, np.int32))])
    assert not out[0].has_error(), out[0].error().message()
    assert _captions(out[0]) == (greedy if beam == 1 else want_beam)
