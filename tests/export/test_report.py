"""export_report.json and decode.json: each written and read by its one owner (ExportReport,
DecodeSettings), and what export wrote reads back as the report export returned."""
import json

from captioner.export.report import EXPORT_REPORT_FILE, Dims, ExportReport, ParityReport
from captioner.serving.core import DecodeSettings


def _report(**kw) -> ExportReport:
    return ExportReport(checkpoint="ckpt_best.pt", step=7, dims=Dims(3, 224, 224, 197, 768, 6, 8, 96, 1000),
                        device="cpu", onnx={"encoder": {"ir_version": 8, "opsets": {"ai.onnx": 17}}},
                        versions={"onnx": "1.17.0"}, fusions={"decode_loop": {"GroupQueryAttention": 6}},
                        kv_cache="in_place", **kw)


def test_export_report_round_trips_and_leaves_out_checks_that_did_not_run(tmp_path):
    r = _report(parity=ParityReport(images=2, captions_equal=2), parity_int4=ParityReport(images=2, passed=False),
                step_graph_int4={"MatMul": 0, "MatMulNBits": 37})
    r.save(tmp_path)
    on_disk = json.loads((tmp_path / EXPORT_REPORT_FILE).read_text())
    assert "parity_int8" not in on_disk and on_disk["parity_int4"]["passed"] is False
    assert on_disk["dims"]["P"] == 197 and on_disk["checkpoint"] == "ckpt_best.pt"
    back = ExportReport.load(tmp_path)
    assert back == r
    assert set(back.quantized_parity()) == {"int4"}

    _report().save(tmp_path)  # --no-verify: no parity entry at all
    assert "parity" not in json.loads((tmp_path / EXPORT_REPORT_FILE).read_text())
    assert ExportReport.load(tmp_path).parity is None


def test_exported_report_reads_back_as_the_one_export_returned(exported_repo):
    repo, report = exported_repo
    assert ExportReport.load(repo) == report


def test_decode_settings_round_trip(tmp_path):
    s = DecodeSettings(bos_id=1, eos_id=2, max_new_tokens=20, n_layers=6, n_heads=8, head_dim=96, length_penalty=0.6)
    s.save(tmp_path)
    assert DecodeSettings.load(tmp_path) == s
