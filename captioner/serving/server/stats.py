"""Triton's per-model statistics, kept once for `captioner serve`: the runtime counts each model
execution (the ensemble's composing models included, as core src/ensemble_scheduler counts
every composing model's requests in that model's own statistics), the data plane each request's
outcome and durations. The ModelStatistics RPC and the Prometheus metrics both read them."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

# The key of a batched request's timing record in its inputs: the data plane puts a dict there,
# the runtime stamps "submit" when it queues the request, the batcher "start" and "end" of its
# batch (queue time = start - submit, compute time = end - start).
TIMING = "__timing__"


@dataclass
class ModelStats:  # one (model, version): the numbers behind Triton's nv_inference_* metrics
    success: int = 0
    failure: dict = field(default_factory=dict)  # reason -> count
    inference_count: int = 0  # batch items run
    exec_count: int = 0  # model executions (a dynamic batch is one)
    request_us: int = 0
    queue_us: int = 0
    compute_us: int = 0
    last_inference: int = 0  # milliseconds since the epoch

    def copy(self) -> "ModelStats":
        return ModelStats(**{**vars(self), "failure": dict(self.failure)})


class Statistics:
    """ModelStats per (model name, version string), thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by: dict[tuple[str, str], ModelStats] = {}

    def executed(self, model: str, version: int | str, rows: int, executions: int) -> None:
        """`model` ran `executions` time(s) over `rows` batch items."""
        with self._lock:
            st = self._by.setdefault((model, str(version)), ModelStats())
            st.inference_count += rows
            st.exec_count += executions
            st.last_inference = int(time.time() * 1000)

    def request(self, model: str, version: int | str, request_us: int, failure: str | None = None,
                queue_us: int = 0, compute_us: int = 0) -> None:
        """One request's outcome: success, or failed for `failure` (a metrics reason)."""
        with self._lock:
            st = self._by.setdefault((model, str(version)), ModelStats())
            st.request_us += request_us
            if failure is not None:
                st.failure[failure] = st.failure.get(failure, 0) + 1
                return
            st.success += 1
            st.queue_us += queue_us
            st.compute_us += compute_us

    def snapshot(self) -> dict[tuple[str, str], ModelStats]:
        """A copy of every model's statistics."""
        with self._lock:
            return {k: s.copy() for k, s in self._by.items()}

    def of(self, model: str, version: int | str) -> ModelStats:
        with self._lock:
            return self._by.get((model, str(version)), ModelStats()).copy()
