"""The Prometheus rendering of `captioner serve`'s statistics in process
(captioner.serving.server.metrics over captioner.serving.server.stats): Triton's family names
without `_total`, typed counter, labelled {model, version} (docs/user_guide/metrics.md), one
failure sample per reason, label values escaped. No server is started."""
import urllib.error
import urllib.request

from prometheus_client.registry import CollectorRegistry

from captioner.serving.server.metrics import FAILURE_REASONS, FAMILIES, TritonCollector, render, start_metrics_server
from captioner.serving.server.stats import ModelStats, Statistics


class Plane:  # the one DataPlane call the metrics front makes
    def __init__(self, stats: Statistics):
        self._stats = stats

    def stats(self):
        return self._stats.snapshot()


def _text(stats: Statistics) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TritonCollector(Plane(stats)))
    return render(registry).decode()


def _known() -> Statistics:
    st = Statistics()
    for _ in range(3):
        st.request("captioner", 1, 400, queue_us=100, compute_us=250)
    st.request("captioner", 1, 50, failure="REJECTED")
    st.executed("captioner", 1, 3, 0)  # rows of its requests
    st.executed("captioner", 1, 0, 2)  # two dynamic batches
    st.executed("encoder", 1, 3, 2)  # a composing model
    return st


def test_known_statistics_render_as_triton_writes_them():
    lines = _text(_known()).splitlines()
    for name, _, _ in FAMILIES:
        assert f"# TYPE {name} counter" in lines and not any(x.startswith(f"{name}_total") for x in lines)
    c = '{model="captioner",version="1"}'
    for want in (f"nv_inference_request_success{c} 3.0", f"nv_inference_count{c} 3.0",
                 f"nv_inference_exec_count{c} 2.0", f"nv_inference_request_duration_us{c} 1250.0",
                 f"nv_inference_queue_duration_us{c} 300.0", f"nv_inference_compute_infer_duration_us{c} 750.0",
                 'nv_inference_count{model="encoder",version="1"} 3.0',
                 'nv_inference_exec_count{model="encoder",version="1"} 2.0',
                 'nv_inference_request_success{model="encoder",version="1"} 0.0'):
        assert want in lines, want
    failures = [x for x in lines if x.startswith('nv_inference_request_failure{model="captioner"')]
    assert failures == [f'nv_inference_request_failure{{model="captioner",version="1",reason="{r}"}} '
                        f'{1.0 if r == "REJECTED" else 0.0}' for r in FAILURE_REASONS]
    help_line = next(x for x in lines if x.startswith("# HELP nv_inference_count "))
    assert help_line == "# HELP nv_inference_count Number of inferences performed (does not include cached requests)"


def test_no_statistics_render_the_families_only():
    text = _text(Statistics())
    assert text.count("# TYPE ") == len(FAMILIES) and "{" not in text


def test_label_values_are_escaped():
    st = Statistics()
    st.request('we"ird\\na\nme', 1, 10)
    line = next(x for x in _text(st).splitlines() if x.startswith("nv_inference_request_success{"))
    assert line == r'nv_inference_request_success{model="we\"ird\\na\nme",version="1"} 1.0'


def test_snapshots_are_copies():
    st = _known()
    snap = st.snapshot()
    snap[("captioner", "1")].failure["REJECTED"] = 99
    assert st.of("captioner", 1).failure == {"REJECTED": 1}
    assert st.of("nope", 1) == ModelStats()


def test_metrics_server_answers_metrics_and_404():
    srv = start_metrics_server(Plane(_known()), "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert b'nv_inference_request_success{model="captioner",version="1"} 3.0' in r.read()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/other", timeout=10)
            raise AssertionError("/other answered")
        except urllib.error.HTTPError as e:
            assert e.code == 404
    finally:
        srv.stop()
