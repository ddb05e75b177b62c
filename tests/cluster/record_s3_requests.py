"""Record the S3 requests our own clients make, per component, against moto_server on
127.0.0.1 (through a recording proxy, also on 127.0.0.1), into
tests/fixtures/s3_requests/<component>.json, the input of tests/cluster/test_minio_policy.py.

    PYTHONPATH=. python -m tests.cluster.record_s3_requests            # all recorded components
    PYTHONPATH=. python -m tests.cluster.record_s3_requests trainer    # one

Each component runs exactly as in the cluster, with the S3 settings its Secret gives it:
- ingest: the pipeline's ingest step reading a raw dataset from s3://datasets/raw/ and
  writing shards to s3://datasets/;
- trainer: `python -m captioner train ... --resume --train.publish_uri=s3://models/runs/...`
  (the PyTorchJob/TrainJob container's arguments, tiny model), started twice: a first run
  and a restart that resumes from the store;
- tensorboard: TensorBoard's loader reading the trainer's events under s3://models/runs;
- pipeline-steps: evaluate (with the run report), export, champion and deploy (twice: a first version and a second
  one) as the KFP components call them;
- kserve-storage-initializer: boto3 making the calls of kserve v0.19.0
  python/storage/kserve_storage/kserve_storage.py Storage._download_s3 (head_bucket, then
  Bucket.objects.filter(Prefix=<path>), then Bucket.download_file per object) on the
  InferenceService's storageUri.
Triton's file, tests/fixtures/s3_requests/triton.json, is recorded elsewhere: from the real
tritonserver (captioner.serving.triton_server) loading the serving folder from moto_server, by
tests/serving/test_triton_server.py (CAPTIONER_REGENERATE_FIXTURES=1 rewrites it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from tests.helpers import ROOT, TINY, free_port, start_moto

OUT = ROOT / "tests" / "fixtures" / "s3_requests"
RUN_URI, DATA_URI, RAW_URI = "s3://models/runs/r1", "s3://datasets/synth/v1", "s3://datasets/raw/synth"
REPO_URI, SERVING_URI = "s3://models/repos/r1", "s3://models/serving"
TB_LOGDIR = "s3://models/runs"  # k8s/base/tensorboard.yaml --logdir


class Moto:
    """moto_server on 127.0.0.1 behind a recording proxy (also on 127.0.0.1): every request a
    client sends passes through the proxy, which notes method, path, query and the copy
    source header, and forwards it unchanged."""

    def __init__(self, tmp: Path):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.p, self.port = start_moto(tmp / "moto.log")
        self.log, self.on, self.refuse_part, lock, port = [], False, False, threading.Lock(), self.port
        rec = self

        class Proxy(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                u = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(u.query, keep_blank_values=True))
                if rec.on:
                    req = {"method": self.command, "path": urllib.parse.unquote(u.path), "query": query}
                    src = self.headers.get("x-amz-copy-source")
                    if src:
                        req["headers"] = {"x-amz-copy-source": urllib.parse.unquote(src)}
                    with lock:
                        rec.log.append(req)
                if rec.refuse_part and self.command == "PUT" and "partNumber" in query:
                    rec.refuse_part = False  # one part upload fails: the client must abort the upload
                    data = b"<Error><Code>AccessDenied</Code><Message>refused by the recorder</Message></Error>"
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                hdrs = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                c.request(self.command, self.path, body=body, headers=hdrs)
                r = c.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD response carries the object's length, not its (empty) body's: readers size
                # their ranged GETs by it (TensorBoard's S3 reader does)
                length = r.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                c.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Proxy)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.env = {"CAPTIONER_S3_ENDPOINT": f"127.0.0.1:{self.server.server_address[1]}",
                    "AWS_ACCESS_KEY_ID": "recorder", "AWS_SECRET_ACCESS_KEY": "recorder",
                    "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> None:
        self.log, self.on = [], True

    def stop(self) -> list[dict]:
        self.on = False
        return list(self.log)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.p.kill()
        self.p.wait()


def _dedupe(reqs: list[dict]) -> list[dict]:
    """Requests in first-seen order, identical ones once (a training run reads the same
    shard every epoch), with object keys under a run's numbered folders kept as recorded."""
    seen, out = set(), []
    for r in reqs:
        k = json.dumps(r, sort_keys=True)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def _save(component: str, source: str, reqs: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {"component": component, "source": source, "requests": _dedupe(reqs)}
    (OUT / f"{component}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{component}: {len(doc['requests'])} distinct requests", flush=True)


def _in_env(env: dict):
    os.environ.update(env)


def large_upload(moto: Moto, uri: str, key: str, tmp: Path) -> None:
    """What the component's store does with an object over storage.PART_SIZE (a real
    checkpoint, shard or ONNX graph): a multipart upload whose first attempt loses a part
    (the client aborts the upload and reports the error), then one that succeeds."""
    from captioner.io.storage import PART_SIZE, StoreError, open_store

    big = tmp / "big.bin"
    big.write_bytes(os.urandom(PART_SIZE + 1024))
    store = open_store(uri)
    moto.refuse_part = True
    try:
        store.put_file(key, big)
        raise AssertionError("the refused part did not fail the upload")
    except StoreError:
        pass
    store.put_file(key, big)
    big.unlink()


def record(which: set[str]) -> None:
    from captioner.data.synthetic import generate

    tmp = Path(tempfile.mkdtemp(prefix="captioner-s3rec-"))
    moto = Moto(tmp)
    try:
        _in_env(moto.env)
        import boto3

        s3 = boto3.session.Session().client("s3", endpoint_url=moto.url, region_name="us-east-1")
        for b in ("datasets", "models"):  # the minio-users Job makes them (root user)
            s3.create_bucket(Bucket=b)
        synth = tmp / "synth"
        generate(synth, images=60, seed=3, side=48, progress=False)
        from captioner.io.storage import publish

        publish(synth, RAW_URI)  # a user uploads the raw dataset (mc cp -r), not a component

        from captioner.pipeline import steps
        moto.start()
        steps.ingest_step(RAW_URI, DATA_URI, shard_mb=0.05)
        large_upload(moto, DATA_URI, "shard-big.tar", tmp)
        reqs = moto.stop()
        if "ingest" in which:
            _save("ingest", "recorded from captioner.pipeline.steps.ingest_step (minio client) against moto_server, "
                  "and one multipart upload of a shard over storage.PART_SIZE (one part refused, then a retry)",
                  reqs)

        overrides = [*TINY, "--train.epochs=2", "--train.ckpt_every=4"]
        cmd = [sys.executable, "-m", "captioner", "train", "--config", "tiny-cpu", "--no-progress", "--resume",
               *overrides, f"--data.source={DATA_URI}", "--train.out_dir=run", f"--train.publish_uri={RUN_URI}"]
        moto.start()
        for _ in range(2):  # a first start, then a restarted pod resuming from the store
            with tempfile.TemporaryDirectory(prefix="captioner-pod-") as pod:
                subprocess.run(cmd, check=True, cwd=pod, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL)
        large_upload(moto, RUN_URI, "ckpt_latest.pt", tmp)
        reqs = moto.stop()
        if "trainer" in which:
            _save("trainer", "recorded from `python -m captioner train --resume --train.publish_uri=s3://...` "
                  "(the training container's command, started twice) against moto_server, and one multipart "
                  "upload of a checkpoint over storage.PART_SIZE (one part refused, then a retry)", reqs)

        if "tensorboard" in which:
            moto.start()
            tensorboard_read(moto.url, TB_LOGDIR)
            _save("tensorboard", "recorded from TensorBoard's own loader (plugin_event_multiplexer, what "
                  "`tensorboard --load_fast=false` uses) and its boto3 S3 reader on --logdir s3://models/runs "
                  "(k8s/base/tensorboard.yaml) against moto_server, after the trainer's runs", moto.stop())
        if not which & {"pipeline-steps", "kserve-storage-initializer"}:
            return

        moto.start()
        ck = f"{RUN_URI}/ckpt_best.pt"
        r = steps.evaluate_step(ck, DATA_URI, str(tmp / "eval"), max_images=8)
        steps.report_step(ck, str(Path(r["out_dir"]) / "samples.html"), str(tmp / "report.html"))
        steps.export_step(ck, REPO_URI, device="cpu")
        champion = steps.champion_score(SERVING_URI)
        steps.deploy_step(REPO_URI, SERVING_URI, max(r["metrics"].get("CIDEr", 0.0), champion), triton_url="")
        steps.champion_score(SERVING_URI)
        for bump in (1.0, 2.0):  # a third version: the oldest one nobody loads is deleted
            steps.deploy_step(REPO_URI, SERVING_URI, r["metrics"].get("CIDEr", 0.0) + bump, triton_url="")
        large_upload(moto, REPO_URI, "encoder/1/model.onnx", tmp)
        reqs = moto.stop()
        if "pipeline-steps" in which:
            _save("pipeline-steps", "recorded from captioner.pipeline.steps evaluate_step, report_step, export_step, "
                  "champion_score and deploy_step (three versions) against moto_server, "
                  "and one multipart upload of an ONNX graph over storage.PART_SIZE (one part refused, then a "
                  "retry)", reqs)

        if "kserve-storage-initializer" in which:
            moto.start()
            kserve_download(moto.url, "s3://models/serving/", tmp / "mnt-models")
            _save("kserve-storage-initializer", "recorded from boto3 making the calls of kserve v0.19.0 "
                  "python/storage/kserve_storage/kserve_storage.py Storage._download_s3 (head_bucket, "
                  "Bucket.objects.filter(Prefix=path), Bucket.download_file) for storageUri s3://models/serving/ "
                  "against moto_server", moto.stop())
    finally:
        moto.close()


def tensorboard_read(endpoint: str, logdir: str) -> None:
    """TensorBoard in the cluster: its S3 reader takes S3_ENDPOINT when it is imported, so it
    runs in its own process, with the Deployment's environment (the recorder's keys)."""
    script = ("import sys\n"
              "from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer\n"
              "m = EventMultiplexer(); m.AddRunsFromDirectory(sys.argv[1]); m.Reload()\n"
              "assert m.Runs(), 'no runs found'\n")
    subprocess.run([sys.executable, "-c", script, logdir], check=True, timeout=600,
                   env={**os.environ, "S3_ENDPOINT": endpoint, "AWS_REGION": "us-east-1"})


def kserve_download(endpoint: str, uri: str, dest: Path) -> list[str]:
    """The S3 calls of kserve_storage.py Storage._download_s3 (v0.19.0), in its order, with its
    target-path rule: key minus the path prefix, leading '/' stripped; zero-size keys and
    keys ending in '/' skipped."""
    import boto3

    parsed = urllib.parse.urlparse(uri)
    bucket_name, bucket_path = parsed.netloc, parsed.path.lstrip("/")
    # a fresh session, as in the initializer's own process (boto3's default session caches credentials)
    s3 = boto3.session.Session().resource("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.meta.client.head_bucket(Bucket=bucket_name)
    bucket, got = s3.Bucket(bucket_name), []
    for obj in bucket.objects.filter(Prefix=bucket_path):
        if obj.key.endswith("/") or obj.size == 0:
            continue
        if bucket_path == obj.key:
            target_key = obj.key.rsplit("/", 1)[-1]
        else:
            target_key = obj.key.removeprefix(bucket_path).lstrip("/")
        target = dest / target_key
        target.parent.mkdir(parents=True, exist_ok=True)
        bucket.download_file(obj.key, str(target))
        got.append(target_key)
    return got


if __name__ == "__main__":
    all_ = {"ingest", "trainer", "pipeline-steps", "kserve-storage-initializer", "tensorboard"}
    record(set(sys.argv[1:]) or all_)
