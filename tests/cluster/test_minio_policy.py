"""Each component's MinIO user may do exactly what the component does: the policies of the
rendered minio-policies ConfigMap, evaluated with MinIO's own semantics (tests/cluster/minio_policy.py,
from minio/minio cmd/ and minio/pkg policy/), against the S3 requests each component makes
(tests/fixtures/s3_requests/: recorded against moto_server: our clients, and KServe's storage
initializer as boto3 making the calls of its v0.19.0 source, by tests/cluster/record_s3_requests.py;
Triton's from the real tritonserver loading the serving folder from S3, by
tests/serving/test_triton_server.py)."""
import json

import pytest

from tests.cluster.manifests import render
from tests.cluster.minio_policy import (Check, condition_values, describe, is_allowed, request_allowed, route,
                                        unused_grants)
from tests.helpers import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "s3_requests"
# which MinIO user each component signs with: the Secret it reads (k8s/base kustomization
# secretGenerator; the kserve overlay's Secret carries Triton's keys) -> the policy the
# minio-users Job attaches to that user (captioner-<who>)
USER = {"ingest": "captioner-pipeline", "pipeline-steps": "captioner-pipeline", "trainer": "captioner-trainer",
        "triton": "captioner-triton", "kserve-storage-initializer": "captioner-triton",
        "tensorboard": "captioner-tensorboard"}
# what a component must NOT be able to do (each is a request some other component, or nobody, makes)
DENIED = {
    "captioner-pipeline": [("GET", "/raw/flickr30k/captions.txt", {}), ("PUT", "/other/x", {}),
                           ("DELETE", "/datasets/synth/v1/manifest.json", {}),
                           ("DELETE", "/models/runs/r1/ckpt_best.pt", {}), ("PUT", "/models", {})],
    "captioner-trainer": [("PUT", "/datasets/synth/v1/manifest.json", {}), ("PUT", "/models/serving/x", {}),
                          ("GET", "/models/serving/champion.json", {}), ("DELETE", "/models/runs/r1/ckpt_best.pt", {}),
                          ("GET", "/models", {"list-type": "2", "prefix": "serving/"}),
                          ("GET", "/datasets", {"list-type": "2", "prefix": ""})],
    "captioner-triton": [("PUT", "/models/serving/captioner/config.pbtxt", {}),
                         ("GET", "/models/runs/r1/ckpt_best.pt", {}),
                         ("GET", "/models", {"list-type": "2", "prefix": "runs/"}),
                         ("GET", "/models", {"prefix": "serving"}),  # no slash: would list serving-old/ too
                         ("GET", "/datasets/synth/v1/manifest.json", {}), ("HEAD", "/datasets", {}),
                         ("DELETE", "/models/serving/champion.json", {}), ("GET", "/models", {"location": ""})],
    "captioner-tensorboard": [("PUT", "/models/runs/r1/tb/events.out.tfevents.1", {}),
                              ("DELETE", "/models/runs/r1/tb/events.out.tfevents.1", {}),
                              ("GET", "/models/serving/champion.json", {}),
                              ("GET", "/models", {"list-type": "2", "prefix": "serving/"}),
                              ("GET", "/models", {"prefix": "runs-old/"}),
                              ("GET", "/datasets/synth/v1/manifest.json", {}), ("HEAD", "/datasets", {})],
}


def _fixture(component):
    doc = json.loads((FIXTURES / f"{component}.json").read_text())
    assert doc["component"] == component and doc["source"] and doc["requests"]
    return doc["requests"]


@pytest.fixture(scope="module")
def policies():
    cm = next(d for d in render("kind") if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "minio-policies")
    return {k[:-len(".json")]: json.loads(v) for k, v in cm["data"].items()}


def test_every_component_has_a_fixture_and_a_user(policies):
    assert {p.stem for p in FIXTURES.glob("*.json")} == set(USER)
    assert set(USER.values()) == set(policies)


@pytest.mark.parametrize("component", sorted(USER))
def test_component_may_make_every_request_it_makes(policies, component):
    pol = policies[USER[component]]
    refused = [describe(r) for r in _fixture(component) if not request_allowed(pol, r)]
    assert not refused, f"{component} ({USER[component]}) is refused {len(refused)} requests, e.g. {refused[:4]}"


@pytest.mark.parametrize("user", sorted(set(USER.values())))
def test_user_is_granted_nothing_its_components_do_not_do(policies, user):
    reqs = [r for c, u in USER.items() if u == user for r in _fixture(c)]
    assert unused_grants(policies[user], reqs) == []
    for method, path, query in DENIED[user]:
        req = {"method": method, "path": path, "query": query}
        assert not request_allowed(policies[user], req), f"{user} may {describe(req)}"


def test_evaluator_follows_minio():
    """The rules the evaluator encodes, each on the case that decides it."""
    head = {"method": "HEAD", "path": "/models", "query": {}}
    lst = {"method": "GET", "path": "/models", "query": {"list-type": "2", "prefix": "serving/"}}
    assert route(head) == [Check("s3:ListBucket", "models")]  # HeadBucketHandler authorises ListBucket
    assert route({"method": "HEAD", "path": "/models/a/b", "query": {}}) == [Check("s3:GetObject", "models", "a/b")]
    assert route({"method": "DELETE", "path": "/m/k", "query": {"uploadId": "u"}}) == [
        Check("s3:AbortMultipartUpload", "m", "k")]
    assert route({"method": "PUT", "path": "/m/k", "query": {}, "headers": {"x-amz-copy-source": "/d/s"}}) == [
        Check("s3:PutObject", "m", "k"), Check("s3:GetObject", "d", "s")]
    assert condition_values(lst)["prefix"] == ["serving/"] and "prefix" not in condition_values(head)
    like = {"Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::models",
                           "Condition": {"StringLike": {"s3:prefix": ["serving", "serving/*"]}}}]}
    assert request_allowed(like, lst) and not request_allowed(like, head)  # no prefix: StringLike is false
    forall = {"Statement": [{**like["Statement"][0],
                             "Condition": {"ForAllValues:StringLike": {"s3:prefix": "serving/*"}}}]}
    assert request_allowed(forall, head) and request_allowed(forall, lst)
    assert not request_allowed(forall, {**lst, "query": {"prefix": "runs/"}})
    null = {"Statement": [{**like["Statement"][0], "Condition": {"Null": {"s3:prefix": "true"}}}]}
    assert request_allowed(null, head) and not request_allowed(null, lst)
    obj = {"Statement": [{"Effect": "Allow", "Action": ["s3:Get*"], "Resource": ["arn:aws:s3:::models/serving/*"]}]}
    assert is_allowed(obj, Check("s3:GetObject", "models", "serving/a/b"), {})  # '*' spans '/'
    assert not is_allowed(obj, Check("s3:GetObject", "models", "servingx/a"), {})
    deny = {"Statement": [*obj["Statement"], {"Effect": "Deny", "Action": "s3:GetObject",
                                              "Resource": "arn:aws:s3:::models/serving/secret*"}]}
    assert not is_allowed(deny, Check("s3:GetObject", "models", "serving/secret.txt"), {})


@pytest.mark.slow
def test_live_ingest_makes_only_recorded_kinds_of_request(policies, tmp_path, monkeypatch):
    """The fixtures stay true to the clients: ingest runs again now, through the recording
    proxy in front of moto_server, and every request it makes is allowed by its user's policy
    and of an action the fixture already holds (else re-record: python -m tests.cluster.record_s3_requests)."""
    from captioner.data.synthetic import generate
    from captioner.io.storage import publish
    from captioner.pipeline.steps import ingest_step
    from tests.cluster.record_s3_requests import Moto

    moto = Moto(tmp_path)
    try:
        for k, v in moto.env.items():
            monkeypatch.setenv(k, v)
        import boto3

        boto3.session.Session().client("s3", endpoint_url=moto.url, region_name="us-east-1").create_bucket(
            Bucket="datasets")
        generate(tmp_path / "raw", images=12, seed=5, side=32, progress=False)
        publish(tmp_path / "raw", "s3://datasets/raw/t")
        moto.start()
        ingest_step("s3://datasets/raw/t", "s3://datasets/t/v1", shard_mb=0.05)
        live = moto.stop()
    finally:
        moto.close()
    assert live
    refused = [describe(r) for r in live if not request_allowed(policies["captioner-pipeline"], r)]
    assert not refused, refused
    known = {c.action for r in _fixture("ingest") for c in route(r)}
    assert {c.action for r in live for c in route(r)} <= known
