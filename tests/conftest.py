import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import pyproject, start_moto, tiny_cfg  # noqa: E402 - after the environment default above


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from captioner.data.synthetic import generate

    d = tmp_path_factory.mktemp("synth")
    generate(d, images=80, seed=3, side=48, progress=False)
    return d


@pytest.fixture
def synth_copy(synth_dir, tmp_path) -> Path:
    """A private copy that a test may damage."""
    d = tmp_path / "data"
    shutil.copytree(synth_dir, d)
    return d


@pytest.fixture(scope="session")
def trained_run(synth_dir, tmp_path_factory):
    """One tiny trained run shared by the read-only tests (evaluate, caption, export...)."""
    from captioner.training.train import train

    out = tmp_path_factory.mktemp("run")
    res = train(tiny_cfg(synth_dir, out, "--train.epochs=3"), progress=False)
    return res


@pytest.fixture(scope="session")
def exported_repo(trained_run, tmp_path_factory):
    from captioner.export.exporter import export

    repo = tmp_path_factory.mktemp("repo") / "models"
    report = export(str(trained_run.out_dir / "ckpt_best.pt"), str(repo), device="cpu")
    return repo, report


@pytest.fixture(scope="session")
def int4_repo(trained_run, tmp_path_factory):
    """The trained run exported with --quantize int4 (4-bit step graph, int8 encoder)."""
    from captioner.export.exporter import export

    repo = tmp_path_factory.mktemp("repo-int4") / "models"
    report = export(str(trained_run.out_dir / "ckpt_best.pt"), str(repo), device="cpu", quantize="int4",
                    verify=False, parity_images=2)
    return repo, report


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 HTTP server (moto_server) on 127.0.0.1 with authentication on: the first
    three actions create an IAM user and key; every later request must be signed by it."""
    import json

    import boto3

    p, port = start_moto(tmp_path_factory.mktemp("moto") / "moto.log",
                         env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    url = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bootstrap",
                       aws_secret_access_key="bootstrap")
    iam.create_user(UserName="captioner-ci")
    key = iam.create_access_key(UserName="captioner-ci")["AccessKey"]
    iam.put_user_policy(UserName="captioner-ci", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    env = {"CAPTIONER_S3_ENDPOINT": f"127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    yield env
    p.kill()
    p.wait()


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path, monkeypatch):
    """The same tests against the local-directory store and the S3 server."""
    import uuid

    if request.param == "local":
        return str(tmp_path / "store")
    env = request.getfixturevalue("s3_server")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return f"s3://bucket-{uuid.uuid4().hex[:8]}/datasets/v1"


@pytest.fixture(scope="session")
def lean_python():
    """A venv (no --system-site-packages) with the base dependencies and the `serve` extra
    only, read from pyproject.toml; kept in the user cache keyed by that list, so later runs
    reuse it. Skips, saying why, only when pip cannot install them."""
    p = pyproject()
    reqs = sorted(p["dependencies"] + p["optional-dependencies"]["serve"])
    key = hashlib.sha256(json.dumps([reqs, sys.version_info[:2]]).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "captioner-tests" / f"lean-{key}"
    py = cache / "bin" / "python"
    if not (cache / ".ok").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(cache)], check=True, capture_output=True)
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs],
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.skip(f"pip cannot install the serve extra {reqs}: {r.stderr.strip().splitlines()[-1:]}")
        (cache / ".ok").write_text("\n".join(reqs))
    return str(py)
