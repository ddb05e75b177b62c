"""export_report.json, the record `captioner export` leaves at the root of a repository:
which checkpoint it came from, the graph dimensions, the ONNX IR/opsets Triton must support,
the library versions, the fused operators per graph, the decode loop's cache mode and dtype,
and the parity results (fp32, and each quantisation when asked for). `ExportReport` owns the
format: export builds one and saves it; the CLI, the pipeline and the demo load it. Nothing
here needs torch or onnx."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

EXPORT_REPORT_FILE = "export_report.json"
QUANTIZED_KINDS = ("int8", "int4")  # the parity_<kind> entries a quantised export adds


@dataclass
class Dims:
    """The exported graphs' dimensions: image channels/height/width, encoder positions P,
    decoder width D, layers L, heads, head width Dh, vocabulary V."""
    C: int
    H: int
    W: int
    P: int
    D: int
    L: int
    heads: int
    Dh: int
    V: int


@dataclass
class ParityReport:
    images: int = 0
    encoder_max_abs_diff: float = 0.0
    logits_max_abs_diff: float = 0.0
    loop_logprobs_max_abs_diff: float = 0.0  # the decode loop's step graph, teacher-forced
    captions_equal: int = 0
    mismatches: list = field(default_factory=list)
    quantized: dict | None = None
    tolerances: dict = field(default_factory=dict)  # the max|diff| each check allows
    passed: bool = True


@dataclass
class ExportReport:
    checkpoint: str  # the checkpoint's file name: no absolute paths, the report travels with the repository
    step: int
    dims: Dims
    device: str
    onnx: dict = field(default_factory=dict)  # graph -> {"ir_version", "opsets"}: what the serving runtime must support
    versions: dict = field(default_factory=dict)  # library -> version that wrote and checked the repository
    fusions: dict = field(default_factory=dict)  # graph -> {fused op type: count}
    kv_cache: str = ""  # the decode loop's cache mode (captioner.export.graphs.cache_mode_for)
    decoder_dtype: str = "float32"
    parity: ParityReport | None = None  # None: exported with --no-verify
    step_graph_int4: dict | None = None  # --quantize int4: the step graph's MatMul / MatMulNBits counts
    parity_int8: ParityReport | None = None  # --quantize int8: parity of the quantised graphs (report only)
    parity_int4: ParityReport | None = None

    def quantized_parity(self) -> dict[str, ParityReport]:
        """{kind: parity} for the quantisations this export checked."""
        return {k: p for k in QUANTIZED_KINDS if (p := getattr(self, f"parity_{k}")) is not None}

    def to_dict(self) -> dict:
        """The JSON form; checks that did not run are left out, not written as null."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "ExportReport":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["dims"] = Dims(**kw["dims"])
        for k in ("parity", *(f"parity_{q}" for q in QUANTIZED_KINDS)):
            if kw.get(k) is not None:
                kw[k] = ParityReport(**kw[k])
        return cls(**kw)

    def save(self, repo: str | Path) -> Path:
        """Write REPO/export_report.json; returns the file."""
        path = Path(repo) / EXPORT_REPORT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, repo: str | Path) -> "ExportReport":
        """Read REPO/export_report.json (REPO: a repository written by `captioner export`)."""
        return cls.from_dict(json.loads((Path(repo) / EXPORT_REPORT_FILE).read_text()))
