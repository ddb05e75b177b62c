"""captioner.serving.onnx_runtime: the sessions' thread settings (the decode loop's step graph
spins between runs only when CAPTIONER_DECODER_SPIN=1 says it has its cores to itself)."""
import pytest

from captioner.core.deployment import DECODER_SPIN_ENV
from captioner.serving.onnx_runtime import decoder_spin, session

SPIN = "session.intra_op.allow_spinning"


@pytest.fixture(scope="module")
def identity_graph(tmp_path_factory):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("ort") / "identity.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("spin, want", [(False, "0"), (True, "1")])
def test_session_threads_spin_only_when_asked(identity_graph, spin, want):
    s = session(identity_graph, threads=1, spin=spin)
    assert s.get_session_options().get_session_config_entry(SPIN) == want


@pytest.mark.parametrize("value, want", [(None, False), ("0", False), ("1", True), ("yes", False)])
def test_decoder_spin_reads_its_environment_variable(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv(DECODER_SPIN_ENV, raising=False)
    else:
        monkeypatch.setenv(DECODER_SPIN_ENV, value)
    assert decoder_spin() is want
