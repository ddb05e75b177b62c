"""KServe v0.19.0: the InferenceService builder, the canary rollout against a fake KServe that
follows KServe's own traffic/status rules, the deploy step's live check against a real
`captioner serve`, and the repository loading in the kserve-tritonserver runtime's mode."""
import copy
import json
import shutil

import pytest
import yaml

from captioner.cluster import kserve as ks
from tests.cluster.crd_schemas import SERVINGRUNTIME_CRD, TRITON_RUNTIME, errors, isvc_errors, load
from tests.helpers import ROOT, Clock

PREV_URL = "http://prev-captioner-predictor.captioner.example.com"
LATEST_URL = "http://latest-captioner-predictor.captioner.example.com"


def _merge(dst: dict, patch: dict) -> dict:
    """RFC 7386 JSON merge patch (what `kubectl patch --type=merge` sends): None deletes."""
    for k, v in patch.items():
        if v is None:
            dst.pop(k, None)
        elif isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


class FakeKServe:
    """The API server + KServe controller + Knative, for one InferenceService, as the rollout
    sees them. Followed from kserve v0.19.0:
    - a change of the predictor's revision template (anything but canaryTrafficPercent)
      creates a Knative revision <name>-predictor-0000N (latestCreatedRevision); it becomes
      ready after `ready_after` reads (None: never), then it is latestReadyRevision;
    - traffic (reconcilers/knative/ksvc_reconciler.go): canaryTrafficPercent set and a
      latestRolledoutRevision known -> latest ready revision X% (tag latest), rolled-out one
      100-X% (tag prev); else latest ready revision 100%;
    - status (apis/serving/v1beta1/inference_service_status.go PropagateStatus): a latest
      ready revision at 100% becomes latestRolledoutRevision (the old one previous);
    - Ready is True when the latest created revision is ready (Knative ConfigurationsReady);
    - the controller reconciles after a write: the first read after one still shows the
      status of before it (status.observedGeneration lags metadata.generation).
    Every object written is validated strictly against the v0.19.0 CRD."""

    def __init__(self, ready_after=1):
        self.ready_after, self.obj, self.revisions, self.writes = ready_after, None, [], []
        self.status, self.last_status, self.stale = {}, None, False

    def _template(self, o):
        p = copy.deepcopy(o["spec"]["predictor"])
        p.pop("canaryTrafficPercent", None)
        return p

    def _written(self, o):
        errs = isvc_errors(o)
        assert errs == [], errs
        self.writes.append(copy.deepcopy(o))

    def create(self, ns, body):
        assert self.obj is None, "409"
        self._written(body)
        self.obj = copy.deepcopy(body)
        self._new_revision()
        return body

    def patch(self, ns, name, patch):
        before = self._template(self.obj)
        new = _merge(copy.deepcopy(self.obj), patch)
        self._written(new)
        self.obj, self.stale = new, True
        if self._template(new) != before:
            self._new_revision()
        return new

    def _new_revision(self):
        self.revisions.append({"name": f"captioner-predictor-{len(self.revisions) + 1:05d}", "reads": 0})

    def get(self, ns, name):
        if self.obj is None:
            return None
        if self.stale and self.last_status is not None:
            self.stale = False
            return {**copy.deepcopy(self.obj), "status": copy.deepcopy(self.last_status)}
        latest = self.revisions[-1]
        latest["reads"] += 1
        ready = [r["name"] for r in self.revisions
                 if r is not latest or (self.ready_after is not None and r["reads"] > self.ready_after)]
        st = self.status
        st["latestCreatedRevision"] = latest["name"]
        if ready:
            st["latestReadyRevision"] = ready[-1]
        lr, rolled = st.get("latestReadyRevision"), st.get("latestRolledoutRevision")
        canary = self.obj["spec"]["predictor"].get("canaryTrafficPercent")
        if canary is not None and rolled:
            traffic = [{"revisionName": lr, "latestRevision": True, "percent": canary, "tag": "latest",
                        "url": LATEST_URL}]
            if canary < 100:
                traffic.append({"revisionName": rolled, "latestRevision": False, "percent": 100 - canary,
                                "tag": "prev", "url": PREV_URL})
        else:
            traffic = [{"revisionName": lr, "latestRevision": True, "percent": 100, "tag": "latest", "url": LATEST_URL}]
        st["traffic"] = traffic if lr else []
        per_rev = {}
        for t in st["traffic"]:
            per_rev[t["revisionName"]] = per_rev.get(t["revisionName"], 0) + t["percent"]
        for t in st["traffic"]:
            if t["revisionName"] != lr or not t["latestRevision"]:
                continue
            if rolled != lr:
                if t["percent"] == 100:  # track the last revision that is fully rolled out
                    st["previousRolledoutRevision"], st["latestRolledoutRevision"] = rolled, lr
            elif lr == latest["name"] and t["percent"] < 100 and per_rev[lr] == 100 \
                    and st.get("previousRolledoutRevision"):
                st["latestRolledoutRevision"] = st["previousRolledoutRevision"]  # rolled back after a full rollout
        out = copy.deepcopy(self.obj)
        ok = lr == latest["name"]
        out["status"] = {"components": {"predictor": copy.deepcopy(st)},
                         "conditions": [{"type": "Ready", "status": "True" if ok else "False"}]}
        self.last_status = copy.deepcopy(out["status"])
        return out

    def traffic(self):
        """Where requests go: percent per revision (targets may name one revision twice)."""
        out = {}
        for t in self.status.get("traffic", []):
            out[t["revisionName"]] = out.get(t["revisionName"], 0) + t["percent"]
        return {k: v for k, v in out.items() if v}


def _rollout(api, version, check=lambda isvc: None, timeout_s=60):
    c = Clock()
    return ks.rollout(api, ks.IsvcSpec("s3://models/serving", version), check, timeout_s=timeout_s, poll_s=5,
                      clock=c, sleep=c.sleep)


def _released(api):
    _rollout(api, 1)
    assert api.status["latestRolledoutRevision"] == "captioner-predictor-00001"
    return api


def test_builder_validates_and_uses_the_triton_runtime():
    isvc = ks.build_inferenceservice(ks.IsvcSpec("s3://models/serving", 3, canary_percent=10))
    assert isvc_errors(isvc) == []
    m = isvc["spec"]["predictor"]["model"]
    rt = yaml.safe_load((ROOT / "k8s/overlays/kserve/servingruntime.yaml").read_text())  # ours, not KServe's
    assert m["runtime"] == rt["metadata"]["name"] and m["storageUri"] == "s3://models/serving/"
    assert {"name": m["modelFormat"]["name"], "version": m["modelFormat"]["version"]} in [
        {"name": f["name"], "version": f["version"]} for f in rt["spec"]["supportedModelFormats"]]
    assert m["protocolVersion"] in rt["spec"]["protocolVersions"]
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 10
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["canaryPercent"] = 10
    assert isvc_errors(bad), "unknown fields are rejected"


def test_first_rollout_goes_to_100_percent():
    api, seen = FakeKServe(), []
    r = _rollout(api, 1, seen.append)
    assert r["previous"] is None and api.traffic() == {"captioner-predictor-00001": 100} and len(seen) == 1
    assert "canaryTrafficPercent" not in api.writes[0]["spec"]["predictor"]


def test_canary_ready_checked_then_promoted():
    api, seen = _released(FakeKServe()), []

    def check(isvc):
        seen.append(ks.canary_target(isvc))
        assert api.traffic() == {"captioner-predictor-00002": 10, "captioner-predictor-00001": 90}

    r = _rollout(api, 2, check)
    assert seen[0]["revisionName"] == "captioner-predictor-00002" and seen[0]["url"] == LATEST_URL
    assert r == {**r, "revision": "captioner-predictor-00002", "previous": "captioner-predictor-00001"}
    assert api.traffic() == {"captioner-predictor-00002": 100}
    assert api.status["latestRolledoutRevision"] == "captioner-predictor-00002"
    assert api.writes[1]["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert "canaryTrafficPercent" not in api.writes[-1]["spec"]["predictor"], "promotion removes the canary split"


def test_canary_not_ready_in_time_rolls_back():
    api, seen = _released(FakeKServe()), []
    api.ready_after = None  # the new revision never becomes ready (image pull, OOM, bad model)
    with pytest.raises(ks.RolloutFailed, match="rolled back to revision captioner-predictor-00001.*not reached"):
        _rollout(api, 2, seen.append)
    assert seen == [], "no live check on a revision that is not ready"
    assert api.traffic() == {"captioner-predictor-00001": 100}
    assert api.writes[-1]["spec"]["predictor"]["canaryTrafficPercent"] == 0


def test_live_check_mismatch_rolls_back():
    api = _released(FakeKServe())

    def check(isvc):
        raise RuntimeError("captions differ from the exported model's")

    with pytest.raises(ks.RolloutFailed, match="captions differ"):
        _rollout(api, 2, check)
    assert api.traffic() == {"captioner-predictor-00001": 100}
    assert api.status["latestRolledoutRevision"] == "captioner-predictor-00001"
    # the next release splits against the revision that is still rolled out
    r = _rollout(api, 3)
    assert r["previous"] == "captioner-predictor-00001" and r["revision"] == "captioner-predictor-00003"


def test_a_check_on_the_old_revision_is_not_a_check_of_the_canary():
    """Waiting for Ready alone is not enough: the service is Ready (old revision) while the
    canary is still being created; the rollout must wait for the new revision's own traffic."""
    api = _released(FakeKServe(ready_after=3))
    checked = []
    _rollout(api, 2, lambda isvc: checked.append(ks.predictor_status(isvc)["latestReadyRevision"]))
    assert checked == ["captioner-predictor-00002"]


# ------------------------------------------------------------------ the deploy step, live
@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)


def _serve(repo, tmp_path, name):
    from tests.helpers import start_serve

    return start_serve(repo, tmp_path / f"{name}.log")


def test_deploy_kserve_promotes_after_the_live_check_and_records_the_champion(exported_repo, s3_env, tmp_path,
                                                                               monkeypatch):
    """The "InferenceService endpoint" is a real `captioner serve` of the exported repository."""
    import captioner.pipeline.steps as steps

    repo, _ = exported_repo
    api = _released(FakeKServe())
    monkeypatch.setattr(ks, "KubeIsvcApi", lambda: api)
    p, url = _serve(repo, tmp_path, "canary")
    try:
        r = steps.deploy_step(str(repo), "s3://serving/kserve", 0.9, target="kserve",
                              kserve={"live_url": url, "poll_s": 0})
    finally:
        p.terminate()
        p.wait(30)
    assert r["revision"] == "captioner-predictor-00002" and api.traffic() == {"captioner-predictor-00002": 100}
    assert steps.champion_score("s3://serving/kserve") == 0.9
    assert api.writes[-1]["spec"]["predictor"]["model"]["storageUri"] == "s3://serving/kserve/"


def test_deploy_kserve_rolls_back_on_a_caption_mismatch_and_keeps_the_champion(exported_repo, s3_env, tmp_path,
                                                                                 monkeypatch):
    """Version 1 goes out (first rollout, live check passes). Version 2's canary serves a
    repository whose decode settings differ from the exported model's (captions cut to 2
    tokens): the live check sees it, the canary is rolled back, the champion stays version 1
    and the serving prefix pins version 1 again (the old revision's pods copy it when they
    start)."""
    import captioner.pipeline.steps as steps
    from captioner.core.names import DECODE_FILE, DECODE_LOOP, ENSEMBLE
    from captioner.io.storage import open_store
    from captioner.serving.triton_repo import listing_from_store, load_listing

    repo, _ = exported_repo
    wrong = tmp_path / "wrong"
    shutil.copytree(repo, wrong)
    f = wrong / DECODE_LOOP / "1" / DECODE_FILE
    d = json.loads(f.read_text())
    d["max_new_tokens"] = 2
    f.write_text(json.dumps(d))
    api = FakeKServe()
    monkeypatch.setattr(ks, "KubeIsvcApi", lambda: api)
    uri = "s3://serving/kserve-bad"
    for served, version in ((repo, 1), (wrong, 2)):
        p, url = _serve(served, tmp_path, f"v{version}")
        try:
            if version == 1:
                steps.deploy_step(str(repo), uri, 0.5, target="kserve", kserve={"live_url": url, "poll_s": 0})
            else:
                with pytest.raises(ks.RolloutFailed, match="captions differ from the exported model's"):
                    steps.deploy_step(str(repo), uri, 0.9, target="kserve", kserve={"live_url": url, "poll_s": 0})
        finally:
            p.terminate()
            p.wait(30)
    assert api.traffic() == {"captioner-predictor-00001": 100}
    assert steps.champion_score(uri) == 0.5, "no champion without promotion"
    models = load_listing(*listing_from_store(open_store(uri)))
    assert models[ENSEMBLE].selected == [1]
    assert {s.model_version for s in models[ENSEMBLE].config.ensemble_scheduling.step} == {1}
    assert 2 in models["decoder"].versions, "version 2 stays published, unpinned"


def test_published_repository_loads_in_the_runtime_mode(exported_repo, tmp_path):
    """kserve-tritonserver starts `tritonserver --model-store=/mnt/models` without
    --model-control-mode: mode none, every model folder is loaded. After two versioned
    publishes (version policies `specific`, ensemble pinned to the newest) the storageUri
    folder loads as a whole, BLS target included."""
    from captioner.io.storage import open_store
    from captioner.serving.triton_repo import listing_from_dir, load_listing, plan_load, publish_version

    args = load(TRITON_RUNTIME)["spec"]["containers"][0]["args"]
    assert "--model-store=/mnt/models" in args and not any(a.startswith("--model-control-mode") for a in args)
    repo, _ = exported_repo
    serving = tmp_path / "serving"
    store = open_store(str(serving), create=True)
    assert [publish_version(repo, store), publish_version(repo, store)] == [1, 2]
    keys, read = listing_from_dir(serving)
    models = load_listing(keys, read)
    order = plan_load(models, sorted(models), read)  # mode none: all of them
    assert set(order) == set(models) and len(models) == 5
    assert models["captioner"].selected == [2] and 2 in models["decoder"].selected


# ------------------------------------------------------------------ k8s/overlays/kserve
@pytest.fixture(scope="module")
def kserve_docs():
    """`kubectl kustomize k8s/overlays/kserve` from a copy whose credentials were made by the
    two generate.sh scripts, as an install does."""
    import subprocess
    import tempfile
    from pathlib import Path

    import yaml

    from tests.helpers import ROOT

    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed: cannot render the overlay")
    tmp = Path(tempfile.mkdtemp(prefix="captioner-kserve-"))
    try:
        shutil.copytree(ROOT / "k8s", tmp / "k8s", ignore=shutil.ignore_patterns("*.env"))
        for script in ("base/secrets/generate.sh", "overlays/kserve/secrets/generate.sh"):
            subprocess.run(["sh", str(tmp / "k8s" / script)], check=True, capture_output=True)
        r = subprocess.run([kubectl, "kustomize", str(tmp / "k8s" / "overlays" / "kserve")], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        triton_env = dict(line.split("=", 1) for line in (tmp / "k8s/base/secrets/triton.env").read_text().split())
        return [d for d in yaml.safe_load_all(r.stdout) if d], triton_env
    finally:
        shutil.rmtree(tmp)


def test_kserve_overlay_validates_strictly(kserve_docs):
    import base64

    import kubernetes_validate

    from tests.cluster.manifests import k8s_version

    docs, triton_env = kserve_docs
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert ("Deployment", "triton") not in by and ("HorizontalPodAutoscaler", "triton") not in by
    isvc = by[("InferenceService", "captioner")]
    assert isvc_errors(isvc) == []
    for d in docs:
        if d["kind"] == "ServingRuntime":
            assert errors(d, SERVINGRUNTIME_CRD, "v1alpha1") == []
        elif d["kind"] != "InferenceService":
            kubernetes_validate.validate(d, k8s_version(), strict=True)
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") in ("captioner", "kubeflow"), d["metadata"]["name"]
    p = isvc["spec"]["predictor"]
    assert p["model"]["storageUri"] == "s3://models/serving/" and p["model"]["modelFormat"]["name"] == "triton"
    assert p["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert p["minReplicas"] >= 1 and p["maxReplicas"] > p["minReplicas"] and p["scaleTarget"] > 0
    sa = by[("ServiceAccount", p["serviceAccountName"])]
    assert {"name": ks.S3_SECRET} in sa["secrets"] and sa["automountServiceAccountToken"] is False
    sec = by[("Secret", ks.S3_SECRET)]
    ann = sec["metadata"]["annotations"]
    assert ann["serving.kserve.io/s3-endpoint"] == "minio.captioner.svc.cluster.local:9000"
    assert ann["serving.kserve.io/s3-usehttps"] == "0"
    data = {k: base64.b64decode(v).decode() for k, v in sec["data"].items()}
    # Triton's read-only MinIO user (policy captioner-triton: GetObject on models/serving/* only)
    assert data == {"AWS_ACCESS_KEY_ID": triton_env["access-key"], "AWS_SECRET_ACCESS_KEY": triton_env["secret-key"]}
    # the predictor pods carry the label the base NetworkPolicies let reach MinIO
    assert p["labels"]["app.kubernetes.io/name"] == "triton"


def test_overlay_inferenceservice_is_the_builder_output():
    import yaml

    from tests.helpers import ROOT

    committed = yaml.safe_load((ROOT / "k8s/overlays/kserve/inferenceservice.yaml").read_text())
    assert committed == ks.build_inferenceservice(ks.IsvcSpec("s3://models/serving", 0))
