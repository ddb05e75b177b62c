"""The launcher's state machine (captioner/cluster/jobs.py) against a fake cluster, and the cost guard."""
import copy

import pytest

from captioner.cluster.jobs import ApiConflict, CostLimitExceeded, JobFailed, JobTimeout, check_cost, launch_and_wait
from captioner.cluster.jobspec import JobSpec
from captioner.cluster.pytorchjob import build_pytorchjob
from captioner.core.cost import estimate_cost
from tests.helpers import Clock


class FakeApi:
    def __init__(self, states, conflict=False, logs=None):
        self.states, self.conflict, self.logs = list(states), conflict, list(logs or [])
        self.created, self.deleted, self.gets = [], [], 0

    def create(self, ns, body):
        if self.conflict:
            raise ApiConflict("409 AlreadyExists")
        self.created.append(body)
        return body

    def get(self, ns, name):
        self.gets += 1
        st = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        conds = [] if st is None else [{"type": st[0], "status": "True", "reason": st[1], "message": st[2]}]
        return {"metadata": {"name": name}, "status": {"conditions": conds}}

    def delete(self, ns, name):
        self.deleted.append(name)

    def master_logs(self, ns, name, since):
        return self.logs.pop(0) if len(self.logs) > 1 else (self.logs[0] if self.logs else "")


JOB = build_pytorchjob(JobSpec(name="captioner-train-x"))


def test_launcher_succeeds_and_streams_logs():
    api, clock, got = FakeApi([None, ("Running", "", ""), ("Succeeded", "Done", "")],
                              logs=["", "step 1\n", "step 1\nstep 2\n"]), Clock(), []
    launch_and_wait(api, JOB, poll_s=5, on_log=got.append, clock=clock, sleep=clock.sleep)
    assert len(api.created) == 1 and api.deleted == ["captioner-train-x"]
    assert "".join(got) == "step 1\nstep 2\n"


def test_launcher_failed_with_reason():
    api, clock = FakeApi([("Running", "", ""), ("Failed", "BackoffLimitExceeded", "worker-0 OOMKilled")]), Clock()
    with pytest.raises(JobFailed, match="BackoffLimitExceeded: worker-0 OOMKilled"):
        launch_and_wait(api, JOB, poll_s=5, on_log=lambda t: None, clock=clock, sleep=clock.sleep)
    assert api.deleted == ["captioner-train-x"]


def test_launcher_timeout_deletes_the_job():
    api, clock = FakeApi([("Running", "", "")]), Clock()
    with pytest.raises(JobTimeout, match="still Running after 60s"):
        launch_and_wait(api, JOB, timeout_s=60, poll_s=10, on_log=lambda t: None, clock=clock, sleep=clock.sleep)
    assert api.deleted == ["captioner-train-x"] and clock.t >= 60


def test_launcher_reattaches_on_409():
    api, clock = FakeApi([("Running", "", ""), ("Succeeded", "", "")], conflict=True), Clock()
    launch_and_wait(api, JOB, poll_s=1, on_log=lambda t: None, clock=clock, sleep=clock.sleep, delete_after=False)
    assert api.created == [] and api.gets == 2 and api.deleted == []


def test_launcher_refuses_invalid_job():
    bad = copy.deepcopy(JOB)
    bad["metadata"]["name"] = "Bad_Name"
    with pytest.raises(ValueError, match="would be rejected"):
        launch_and_wait(FakeApi([None]), bad)


def test_cost_guard():
    est = estimate_cost(pairs_per_epoch=145_000, epochs=20, pairs_per_s_per_gpu=1000, gpus=16, price_per_gpu_hour=3.0)
    check_cost(est, max_cost=10)
    with pytest.raises(CostLimitExceeded, match=r"exceeds max_cost \$1.00"):
        check_cost(est, max_cost=1.0)
    check_cost(est, max_cost=1.0, override=True)
