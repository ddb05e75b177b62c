"""Stores and URIs (`captioner.io.storage`): object keys that would land outside the download
folder, mistyped S3 URIs, S3 credentials and endpoints, multipart uploads, the umask of
written files, and secrets kept out of reprs.

Hostile inputs: each test performs the attack with probes generated here and checks the
bounded outcome: refused with an error naming the offender, nothing written outside the
target folder, memory bounded (generous margins, never timings)."""
import os
import subprocess
import sys
import time

import pytest

from captioner.data.ingest import ingest
from captioner.io.storage import open_store
from tests.helpers import files_under, probe_opts

ENV = {**os.environ}


@pytest.mark.parametrize("attack", ["absolute", "dotdot"])
def test_fetch_skips_keys_that_would_land_outside(s3_server, monkeypatch, tmp_path, caplog, attack):
    from captioner.io.storage import fetch

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    outside = tmp_path / "outside"
    bucket = f"fetch-{attack}"
    store = open_store(f"s3://{bucket}/run", create=True)
    store.put_bytes("ckpt_best.pt", b"good")
    store.put_bytes("sub/metrics.jsonl", b"{}")
    hostile = {"absolute": [f"run/{outside}/evil.pth"], "dotdot": ["run/../escape.pth", "run/sub/../../escape2.pth"]}[attack]
    import boto3  # the minio client refuses to *write* '..' names; S3 itself stores them

    s3 = boto3.client("s3", endpoint_url=f"http://{s3_server['CAPTIONER_S3_ENDPOINT']}", region_name="us-east-1",
                      aws_access_key_id=s3_server["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=s3_server["AWS_SECRET_ACCESS_KEY"])
    for key in hostile:  # `prefix//abs/path`, `..` keys: legal S3 object names
        s3.put_object(Bucket=bucket, Key=key, Body=b"pwned")
    listed = store.list()
    assert any(k.startswith("/") or ".." in k for k in listed), listed  # the server keeps the hostile names
    local = tmp_path / "dl" / "run"
    with caplog.at_level("WARNING"):
        got = fetch(f"s3://{bucket}/run", local)
    assert got == local
    assert (local / "ckpt_best.pt").read_bytes() == b"good" and (local / "sub" / "metrics.jsonl").exists()
    assert not outside.exists() and not (tmp_path / "dl" / "escape.pth").exists()
    assert files_under(tmp_path / "dl") == {"run", "run/ckpt_best.pt", "run/sub", "run/sub/metrics.jsonl"}
    assert "outside the download folder" in caplog.text and hostile[0][4:] in caplog.text


@pytest.mark.parametrize("dest", ["s3:/bucket", "s3:bucket/x", "S3://bucket/x", "gs://bucket/x", "http://host/x"])
def test_mistyped_s3_uri_is_refused_and_nothing_is_written(synth_dir, tmp_path, dest):
    work = tmp_path / "cwd"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "captioner", "ingest", str(synth_dir), dest, "--no-progress"],
                       cwd=work, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stdout
    assert dest in r.stderr and "s3://bucket/prefix" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_written_files_respect_the_umask(synth_dir, tmp_path, umask):
    import torch

    from captioner.modeling.checkpoint import atomic_save

    old = os.umask(umask)
    try:
        src = tmp_path / "src"
        (src / "flickr30k_images").mkdir(parents=True)
        for p in sorted((synth_dir / "flickr30k_images").glob("*.jpg"))[:4]:
            (src / "flickr30k_images" / p.name).write_bytes(p.read_bytes())
        (src / "results.csv").write_text("".join(f"{p.name}| 0| a thing\n"
                                                 for p in sorted((src / "flickr30k_images").glob("*.jpg"))))
        ingest(str(src), str(tmp_path / "out"), probe_opts())
        atomic_save({"w": torch.zeros(2)}, tmp_path / "run" / "ckpt_latest.pt")  # how training writes checkpoints
    finally:
        os.umask(old)
    written = [p for p in [*(tmp_path / "out").rglob("*"), tmp_path / "run" / "ckpt_latest.pt"] if p.is_file()]
    assert len(written) >= 2
    for p in written:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, f"{p}: {oct(p.stat().st_mode & 0o777)}"


def test_s3_secret_never_appears_in_repr():
    from captioner.io.storage import S3Settings

    s = S3Settings.from_env("127.0.0.1:9000", "AKIAPROBE", "s3cr3t-probe-value", False)
    assert s.secret_key == "s3cr3t-probe-value"
    for text in (repr(s), str(s), f"{s}", repr([s])):
        assert "s3cr3t-probe-value" not in text, text


@pytest.mark.parametrize("case", ["bad-key", "unreachable"])
def test_wrong_credentials_or_endpoint_fail_fast_and_clearly(synth_dir, s3_server, case):
    env = {**os.environ, **s3_server}
    if case == "bad-key":
        env["AWS_SECRET_ACCESS_KEY"] = "wrong-secret"
        env["AWS_ACCESS_KEY_ID"] = "AKIAWRONGWRONGWRONG"
        needle = "InvalidAccessKeyId"
    else:
        env["CAPTIONER_S3_ENDPOINT"] = "127.0.0.1:9"
        needle = "cannot reach the endpoint"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "captioner", "ingest", str(synth_dir), "s3://bucket/x", "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert needle in r.stderr and env["CAPTIONER_S3_ENDPOINT"] in r.stderr
    assert "Traceback" not in r.stderr and "wrong-secret" not in r.stderr
    assert time.time() - t0 < 60


def test_large_objects_go_multipart_and_keep_their_checksum(s3_server, monkeypatch, tmp_path):
    import hashlib

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    from captioner.io.storage import PART_SIZE

    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(PART_SIZE + 3 * 1024 * 1024))
    store = open_store("s3://multipart/x", create=True)
    store.put_file("big.tar", big)
    st = store.client.stat_object("multipart", "x/big.tar")
    assert st.etag.endswith("-2"), f"expected a 2-part upload, etag {st.etag}"
    want = hashlib.sha256(big.read_bytes()).hexdigest()
    assert store.stored_sha256("big.tar") == want == store.sha256("big.tar")
