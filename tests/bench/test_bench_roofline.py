"""`captioner bench latency --json` carries each served path's roofline (bytes per step, the
copy bandwidth measured in the same run, the floor per step and per caption, the share of the
floor reached), on the tiny config. Nothing here is timed: only the fields and their arithmetic."""
import json

import pytest

ROOF = ("step_weight_bytes", "step_state_bytes", "encoder_ms", "step_ms", "floor_step_ms", "floor_caption_ms",
        "caption_ms", "fraction_of_floor", "step_vs_floor")


@pytest.mark.slow
def test_bench_latency_json_has_a_roofline_per_served_path(capsys):
    from captioner.bench.caption_latency import main

    main(["--config", "tiny-cpu", "--vocab", "40", "--runs", "1", "--batch", "2", "--served-only", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["copy_bandwidth_gb_s"] > 0 and isinstance(out["cpu_flags"], list)
    roofs = {name: r["roofline"] for name, r in out["rows"].items() if "roofline" in r}
    assert sorted(r["weights"] for r in roofs.values()) == ["fp32", "int4", "int8"], list(roofs)
    for name, r in roofs.items():
        assert set(ROOF) <= set(r), (name, r)
        bw = out["copy_bandwidth_gb_s"] * 1e9
        assert r["floor_step_ms"] == pytest.approx((r["step_weight_bytes"] + r["step_state_bytes"]) / bw * 1e3)
        assert r["floor_caption_ms"] == pytest.approx(r["encoder_ms"] + out["tokens"] * r["floor_step_ms"])
        assert r["fraction_of_floor"] == pytest.approx(r["floor_caption_ms"] / r["caption_ms"])
        assert r["caption_ms"] == pytest.approx(out["rows"][name]["latency_b1_ms"])
    b = {r["weights"]: r["step_weight_bytes"] for r in roofs.values()}
    assert b["int4"] < b["int8"] < b["fp32"], b  # fewer bytes per weight
