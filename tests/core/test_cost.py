"""The training cost estimate (captioner/core/cost.py) the cluster's cost guard and the run report use."""
import pytest

from captioner.core.cost import estimate_cost


def test_estimate_cost():
    est = estimate_cost(pairs_per_epoch=145_000, epochs=20, pairs_per_s_per_gpu=1000, gpus=16, price_per_gpu_hour=3.0)
    # 145k * 20 / (1000 * 16 * 0.9) s = 201.4 s = 0.0559 h; x16 GPUs = 0.895 GPU-h; x $3
    assert est.hours == pytest.approx(0.05594, rel=1e-3) and est.cost == pytest.approx(2.685, rel=1e-3)
    assert est.text() == "estimated 0.9 GPU-hours (16 GPUs x 0.06 h) = $2.69 at $3.00/GPU-hour"
    one = estimate_cost(pairs_per_epoch=3600, epochs=1, pairs_per_s_per_gpu=1, gpus=1, price_per_gpu_hour=2.0)
    assert one.hours == 1.0 and one.cost == 2.0  # one GPU: no scaling loss
    with pytest.raises(ValueError, match="must be positive"):
        estimate_cost(1, 1, 0, 1, 1.0)
