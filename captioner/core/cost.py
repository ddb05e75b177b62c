"""What a training run costs on GPUs: hours from measured per-GPU throughput, times the GPU
count and a price. Used by the pipeline's cost guard before it launches a cluster job
(captioner/cluster/jobs.py: check_cost), by the run report and the "cost so far" curve
(train.price_per_gpu_hour)."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PAIRS_PER_S_PER_GPU = 900.0  # the pipeline's cost guard default (cluster settings override it)
DEFAULT_PRICE_PER_GPU_HOUR = 3.0


@dataclass
class CostEstimate:
    gpus: int
    hours: float
    gpu_hours: float
    cost: float
    price_per_gpu_hour: float

    def text(self) -> str:
        return (f"estimated {self.gpu_hours:.1f} GPU-hours ({self.gpus} GPUs x {self.hours:.2f} h) "
                f"= ${self.cost:,.2f} at ${self.price_per_gpu_hour:.2f}/GPU-hour")


def estimate_cost(pairs_per_epoch: int, epochs: int, pairs_per_s_per_gpu: float, gpus: int,
                  price_per_gpu_hour: float, scaling_efficiency: float = 0.9) -> CostEstimate:
    """Hours from measured per-GPU throughput; multi-GPU runs rarely scale perfectly."""
    if pairs_per_s_per_gpu <= 0 or gpus <= 0:
        raise ValueError("pairs_per_s_per_gpu and gpus must be positive")
    eff = 1.0 if gpus == 1 else scaling_efficiency
    hours = pairs_per_epoch * epochs / (pairs_per_s_per_gpu * gpus * eff) / 3600
    return CostEstimate(gpus, hours, hours * gpus, hours * gpus * price_per_gpu_hour, price_per_gpu_hour)
