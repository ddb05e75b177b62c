"""What both training APIs share (captioner/cluster/jobspec.py)."""
from captioner.cluster.jobspec import JobSpec, job_name
from captioner.cluster.pytorchjob import build_pytorchjob, webhook_errors


def test_job_name_is_deterministic_dns1035():
    a, b = job_name("Captioner Train!", "run-123"), job_name("Captioner Train!", "run-123")
    assert a == b and a != job_name("Captioner Train!", "run-124")
    assert webhook_errors(build_pytorchjob(JobSpec(name=job_name("9lives", "x")))) == []
