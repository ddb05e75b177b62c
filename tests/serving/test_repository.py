"""The exported Triton repository is exact: configs parse, agree with the ONNX graphs and
with each other, and the Python-backend models run through a pb_utils test double."""
import ast
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from tritonclient.grpc import model_config_pb2 as mc

from captioner.core import names
from captioner.data.samples import sample_images
from captioner.modeling.checkpoint import load_checkpoint
from captioner.modeling.inference import caption_tensor
from captioner.serving.core import DecodeSettings, image_bytes_to_pixels
from captioner.serving.triton_repo import VERSION_README, read_config
from tests.helpers import load_model_py
from tests.serving import pb_utils_double

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.INT64: mc.TYPE_INT64}


def _configs(repo):
    return {p.parent.name: read_config(p) for p in sorted(Path(repo).glob("*/config.pbtxt"))}


def test_every_config_parses_and_names_its_folder(exported_repo):
    repo, _ = exported_repo
    cfgs = _configs(repo)
    assert set(cfgs) == {names.ENSEMBLE, names.PREPROCESS, names.ENCODER, names.DECODER, names.DECODE_LOOP}
    for folder, cfg in cfgs.items():
        assert cfg.name == folder
        assert (repo / folder / "1" / VERSION_README).is_file()  # S3 keeps no empty folder
        assert cfg.max_batch_size > 0
    kinds = {n: cfgs[n].instance_group[0].kind for n in (names.ENCODER, names.DECODER)}
    assert set(kinds.values()) == {mc.ModelInstanceGroup.KIND_CPU}  # exported with --device cpu


def _onnx_io(path):
    m = onnx.load(str(path))
    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
    return ({i.name: (i.type.tensor_type.elem_type, dims(i)) for i in m.graph.input},
            {o.name: (o.type.tensor_type.elem_type, dims(o)) for o in m.graph.output})


@pytest.mark.parametrize("model", [names.ENCODER, names.DECODER])
def test_onnx_configs_match_graphs(exported_repo, model):
    repo, _ = exported_repo
    cfg = read_config(repo / model / "config.pbtxt")
    ins, outs = _onnx_io(repo / model / "1" / "model.onnx")
    assert {t.name for t in cfg.input} == set(ins)
    assert {t.name for t in cfg.output} <= set(outs)
    for t in list(cfg.input) + list(cfg.output):
        elem, dims = (ins | outs)[t.name]
        assert ONNX_TO_TRITON[elem] == t.data_type, t.name
        assert dims[0] == -1, f"{t.name}: the batch axis must be dynamic"
        assert len(t.dims) == len(dims) - 1, f"{t.name}: config dims must exclude the batch dimension"
        for c, g in zip(t.dims, dims[1:]):
            # a dynamic ONNX axis accepts a fixed config dim (Triton allows the config to be more
            # specific); a dynamic config dim needs a dynamic ONNX axis
            assert c == g or g == -1, f"{t.name}: config {list(t.dims)} vs onnx {dims[1:]}"


def test_ensemble_maps_are_consistent(exported_repo):
    repo, _ = exported_repo
    cfgs = _configs(repo)
    ens = cfgs[names.ENSEMBLE]
    assert ens.platform == "ensemble"
    available = {t.name: (t.data_type, list(t.dims)) for t in ens.input}
    optional = {t.name for t in ens.input if t.optional}
    for step in ens.ensemble_scheduling.step:
        m = cfgs[step.model_name]
        m_in = {t.name: t for t in m.input}
        m_out = {t.name: t for t in m.output}
        assert m.max_batch_size >= ens.max_batch_size
        for key, val in step.input_map.items():
            assert key in m_in, f"{step.model_name} has no input {key}"
            assert val in available, f"{val} is not produced before {step.model_name}"
            assert available[val] == (m_in[key].data_type, list(m_in[key].dims)), (key, val)
            if val in optional:
                assert m_in[key].optional, f"optional {val} feeds required {step.model_name}.{key}"
        for n, t in m_in.items():
            assert t.optional or n in step.input_map, f"{step.model_name}.{n} is not fed"
        for key, val in step.output_map.items():
            assert key in m_out, f"{step.model_name} has no output {key}"
            available[val] = (m_out[key].data_type, list(m_out[key].dims))
    for t in ens.output:
        assert available.get(t.name) == (t.data_type, list(t.dims)), t.name


def _names_used(model_py: Path) -> set[str]:
    tree = ast.parse(model_py.read_text())
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "captioner.core.names":
            used |= {a.name for a in node.names}
    return {getattr(names, n) for n in used if n.isupper() and n not in ("DECODER",)}


def test_bls_tensor_names_exist_in_called_configs(exported_repo):
    repo, _ = exported_repo
    cfgs = _configs(repo)
    for model, called in [(names.DECODE_LOOP, []), (names.PREPROCESS, [])]:
        own = {t.name for t in list(cfgs[model].input) + list(cfgs[model].output)}
        other = {t.name for c in called for t in list(cfgs[c].input) + list(cfgs[c].output)}
        used = _names_used(repo / model / "1" / "model.py")
        assert used, model
        assert used <= own | other, f"{model}/model.py uses {sorted(used - own - other)} that no config declares"
    dec = {t.name for t in cfgs[names.DECODER].input}
    assert {names.INPUT_IDS, names.CROSS_KV, names.PAST_KV} <= dec
    import onnxruntime as ort  # the graph decode_loop runs in process has the step graph's inputs

    shipped = ort.InferenceSession(str(repo / names.DECODE_LOOP / "1" / names.DECODER_GRAPH_FILE))
    L = DecodeSettings.load(repo / names.DECODE_LOOP / "1").n_layers
    per_layer = [n.format(i) for i in range(L) for n in (names.CROSS_KEY, names.CROSS_VALUE, names.PAST_KEY,
                                                          names.PAST_VALUE)]
    assert {i.name for i in shipped.get_inputs()} == {names.INPUT_IDS, names.PAST_LENGTH, *per_layer}


def test_preprocess_model_py(exported_repo, trained_run, monkeypatch):
    repo, _ = exported_repo
    m = load_model_py(repo, names.PREPROCESS, monkeypatch)
    ck = load_checkpoint(trained_run.out_dir)
    imgs = [b for _, b in sample_images(ck.config.data, 3)]
    R = pb_utils_double.FakeRequest
    reqs = [R(IMAGE=np.array([[imgs[0]], [imgs[1]]], dtype=object)), R(IMAGE=np.array([[b"garbage"]], dtype=object)),
            R(IMAGE=np.array([[imgs[2][:100]]], dtype=object)), R(IMAGE=np.array([[b""]], dtype=object)),
            R(IMAGE=np.array([[imgs[2]]], dtype=object))]
    out = m.execute(reqs)
    assert len(out) == len(reqs)
    assert [r.has_error() for r in out] == [False, True, True, True, False]
    assert "not a recognised image format" in out[1].error().message()
    assert "cannot decode" in out[2].error().message() and "empty" in out[3].error().message()
    px = pb_utils_double.get_output_tensor_by_name(out[0], names.PIXEL_VALUES).as_numpy()
    np.testing.assert_allclose(px, image_bytes_to_pixels(np.array(imgs[:2], dtype=object), ck.preprocess))
    assert px.shape == (2, *ck.preprocess.input_size)


def test_preprocess_model_py_refuses_a_request_over_the_pixel_budget(exported_repo, monkeypatch):
    """The request pixel budget in the Triton model too: three 12-megapixel PNGs (each under the per-image cap)
    are refused together from their headers, before any of them is decoded."""
    import io

    from PIL import Image

    from captioner.core.limits import REQUEST_PIXEL_BUDGET

    repo, _ = exported_repo
    m = load_model_py(repo, names.PREPROCESS, monkeypatch)
    buf = io.BytesIO()
    Image.new("L", (4000, 3000)).save(buf, format="PNG")  # 12 MP, a few KB compressed
    big = buf.getvalue()
    assert 3 * 4000 * 3000 > REQUEST_PIXEL_BUDGET
    out = m.execute([pb_utils_double.FakeRequest(IMAGE=np.array([[big]] * 3, dtype=object))])
    assert out[0].has_error() and "per-request pixel budget" in out[0].error().message()


def test_decode_loop_model_py_matches_pytorch(exported_repo, trained_run, monkeypatch):
    repo, _ = exported_repo
    m = load_model_py(repo, names.DECODE_LOOP, monkeypatch)
    backend = sys.modules["triton_python_backend_utils"].backend
    batches, make_step = [], m.loop.make_step
    m.loop.make_step = lambda cross: batches.append(cross.shape[0]) or make_step(cross)
    ck = load_checkpoint(trained_run.out_dir)
    imgs = [b for _, b in sample_images(ck.config.data, 4)]
    pixels = image_bytes_to_pixels(np.array(imgs, dtype=object), ck.preprocess)
    with torch.no_grad():
        _, cross = ck.model.encode_for_decoding(torch.from_numpy(pixels))
    want = caption_tensor(ck.model, ck.tokenizer, torch.from_numpy(pixels))
    cross = cross.numpy()
    R = pb_utils_double.FakeRequest
    reqs = [
        R(cross_kv=cross[:2]),                                                  # 2 images, greedy
        R(cross_kv=cross[2:3], BEAM_SIZE=np.array([[3]], np.int32)),            # beam
        R(cross_kv=cross[:1, :, :, :5]),                                        # wrong patch count
        R(cross_kv=cross[3:4].astype(np.float64)),                              # wrong dtype
        R(cross_kv=cross[3:4], BEAM_SIZE=np.array([[99]], np.int32)),           # bad parameter
        R(cross_kv=cross[3:4], MAX_TOKENS=np.array([[2]], np.int32)),           # short
        R(cross_kv=cross[3:4]),
    ]
    out = m.execute(reqs)
    assert len(out) == len(reqs)
    assert [r.has_error() for r in out] == [False, False, True, True, True, False, False]
    cap = lambda r: [c.decode() for c in pb_utils_double.get_output_tensor_by_name(r, names.CAPTION).as_numpy().reshape(-1)]  # noqa: E731
    assert cap(out[0]) == want[:2]
    assert cap(out[6]) == [want[3]]
    assert len(cap(out[5])[0].split()) <= 2
    assert "BEAM_SIZE must be between 1 and 8, got 99" in out[4].error().message()
    assert "FP32" in out[3].error().message() and "shape" in out[2].error().message()
    assert backend.calls == []  # the decoder runs in process: no BLS call
    # requests 0 and 6 (greedy, full length: 3 images) were batched into one decode
    assert batches[0] == 3


def test_export_parity_report(exported_repo):
    _, report = exported_repo
    p = report.parity
    assert p.encoder_max_abs_diff < 1e-3 and p.logits_max_abs_diff < 1e-2
    assert p.captions_equal == p.images > 0
