"""The exported repository against Triton's own rules (captioner.serving.triton_repo, which names the
triton-inference-server/core files it follows) and python_backend's behaviour (the pb_utils
double): each test guards a way a deployment failed on a real Triton: what S3 lists, models
reached only through BLS, GPU-resident outputs, the control API, versions switched half way,
replicas behind one Service."""
import json
import re
import shutil
import uuid

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from captioner.core import names
from captioner.core.deployment import CONTROL_HEADER, CONTROL_KEY_ENV
from captioner.serving import triton_repo
from captioner.serving.core import DecodeSettings
from captioner.serving.triton_repo import (ALL_MODELS, CONFIG, LOAD_ORDER, RepositoryError, listing_from_dir,
                                           listing_from_store, load_listing, plan_load)
from tests.helpers import load_model_py, start_serve
from tests.serving import pb_utils_double


def _cfg(name, **kw):
    return triton_repo.config_text(mc.ModelConfig(name=name, backend="python", max_batch_size=1, **kw)).encode()


def _listing(files: dict[str, bytes]):
    return load_listing(list(files), files.__getitem__)


# ------------------------------------------------------------------ what S3 returns (objects only, no folders)
def test_s3_listing_of_the_exported_repository_loads_every_model(exported_repo, s3_server, monkeypatch):
    """Publish to the S3 test server, list it back (objects only) and apply Triton's rules:
    an empty `captioner/1/` would vanish on S3 and the ensemble would have no version."""
    from captioner.io.storage import open_store, publish

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    repo, _ = exported_repo
    uri = f"s3://serving-{uuid.uuid4().hex[:8]}/models"
    publish(repo, uri)
    keys, read = listing_from_store(open_store(uri))
    models = load_listing(keys, read)
    assert {n: m.error for n, m in models.items()} == {n: None for n in ALL_MODELS}
    assert plan_load(models, LOAD_ORDER, read) == [names.PREPROCESS, names.ENCODER, names.DECODE_LOOP, names.ENSEMBLE]
    assert all(models[n].selected == [1] for n in ALL_MODELS)


@pytest.mark.parametrize("files, reason", [
    ({"captioner/config.pbtxt": _cfg("captioner")}, "at least one version must be available"),
    ({"m/config.pbtxt": _cfg("m"), "m/latest/model.py": b""}, "at least one version must be available"),
    ({"m/config.pbtxt": _cfg("other"), "m/1/model.py": b""}, "unexpected model name 'other'"),
    ({"m/1/model.py": b""}, "config.pbtxt not found"),
    ({"m/config.pbtxt": b"name: 'm' bogus_field: 1", "m/1/model.py": b""}, "not a valid ModelConfig"),
    ({"m/config.pbtxt": _cfg("m", version_policy=mc.ModelVersionPolicy(
        specific=mc.ModelVersionPolicy.Specific(versions=[2]))), "m/1/model.py": b""},
     "at least one version must be available"),
])
def test_contract_refuses_what_triton_refuses(files, reason):
    name = next(iter(files)).split("/")[0]
    with pytest.raises(RepositoryError, match=reason):
        plan_load(_listing(files), [name])


def test_ensemble_steps_must_resolve():
    S = mc.ModelEnsembling.Step
    ens = _cfg("e", platform="ensemble", ensemble_scheduling=mc.ModelEnsembling(step=[S(model_name="a", model_version=3)]))
    files = {"e/config.pbtxt": ens, "e/1/README.md": b""}
    with pytest.raises(RepositoryError, match="'a': model not found in any model repository.*ensemble 'e'"):
        plan_load(_listing(files), ["e"])
    files |= {"a/config.pbtxt": _cfg("a"), "a/1/model.py": b""}
    with pytest.raises(RepositoryError, match="step model 'a' version 3 is not available"):
        plan_load(_listing(files), ["e"])
    files |= {"a/3/model.py": b""}
    files["a/config.pbtxt"] = _cfg("a", version_policy=mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All()))
    assert plan_load(_listing(files), ["e"]) == ["a", "e"]


def test_serve_refuses_a_repository_triton_would_refuse(exported_repo, tmp_path):
    from captioner.serving.server.runtime import Repository

    repo = tmp_path / "repo"
    shutil.copytree(exported_repo[0], repo)
    (repo / names.ENSEMBLE / "1" / triton_repo.VERSION_README).unlink()  # what S3 holds after the old export
    with pytest.raises(RepositoryError, match="at least one version must be available under the version policy "
                                              "of model 'captioner'"):
        Repository(repo)


# ------------------------------------------------------------------ no model reached only through BLS
def test_no_python_model_calls_another_through_bls():
    """Triton does not load a model's BLS targets as dependencies, so a model reached only through
    BLS would be missing in explicit mode. plan_load loads an ensemble's steps and nothing else:
    that is enough only while no Python model makes a BLS call (decode_loop runs its decoder in
    process)."""
    from tests.helpers import ROOT

    for src in sorted((ROOT / "captioner" / "serving" / "triton").glob("*.py")):
        text = src.read_text()
        assert "InferenceRequest(" not in text and "async_exec" not in text, f"{src.name} makes a BLS call"


def test_decode_loop_captions_with_only_the_ensemble_loaded(exported_repo, monkeypatch):
    """decode_loop runs its own decoder graph (no BLS call per token), so `decoder` need not be loaded."""
    repo, _ = exported_repo
    assert LOAD_ORDER == (names.ENSEMBLE,)
    m = load_model_py(repo, names.DECODE_LOOP, monkeypatch, load=[names.ENSEMBLE])
    assert names.DECODER not in pb_utils_double._backend.loaded
    s = DecodeSettings.load(repo / names.DECODE_LOOP / "1")
    cross = np.zeros((1, 2 * s.n_layers, s.n_heads, 16, s.head_dim), np.float32)
    out = m.execute([pb_utils_double.FakeRequest(cross_kv=cross)])
    assert not out[0].has_error(), out[0].error().message()


@pytest.mark.parametrize("missing", [names.DECODER_GRAPH_FILE, names.SELECT_ROWS_FILE])
def test_decode_loop_without_its_decoder_graph_is_refused(exported_repo, missing):
    """Its initialize() opens the graph from its own version folder; Triton's load would fail."""
    keys, read = listing_from_dir(exported_repo[0])
    keys = [k for k in keys if k != f"{names.DECODE_LOOP}/1/{missing}"]
    with pytest.raises(RepositoryError, match=f"'decode_loop': version 1 lacks {missing}"):
        plan_load(load_listing(keys, read), LOAD_ORDER, read)


# ------------------------------------------------------------------ GPU-resident BLS outputs
@pytest.fixture
def gpu_repo(exported_repo, tmp_path):
    """The exported repository with the decoder as on the cluster: instance_group KIND_GPU."""
    repo = tmp_path / "gpu_repo"
    shutil.copytree(exported_repo[0], repo)
    cfg = triton_repo.read_config(repo / names.DECODER / CONFIG)
    for g in cfg.instance_group:
        g.kind = mc.ModelInstanceGroup.KIND_GPU
    (repo / names.DECODER / CONFIG).write_text(triton_repo.config_text(cfg))
    return repo


def test_pb_utils_double_returns_gpu_tensors_for_a_kind_gpu_callee(gpu_repo, monkeypatch):
    pb = pb_utils_double.make_module(gpu_repo, (names.DECODER,) + LOAD_ORDER)
    s = DecodeSettings.load(gpu_repo / names.DECODE_LOOP / "1")
    inputs = [pb.Tensor(names.INPUT_IDS, np.ones((1, 1), np.int64)),
              pb.Tensor(names.CROSS_KV, np.zeros((1, 2 * s.n_layers, s.n_heads, 16, s.head_dim), np.float32)),
              pb.Tensor(names.PAST_KV, np.zeros((1, 2 * s.n_layers, s.n_heads, 0, s.head_dim), np.float32))]
    r = pb.InferenceRequest(model_name=names.DECODER, requested_output_names=[names.LOGITS], inputs=inputs).exec()
    with pytest.raises(pb.TritonModelException, match="Tensor is stored in GPU and cannot be converted to NumPy"):
        pb.get_output_tensor_by_name(r, names.LOGITS).as_numpy()
    r = pb.InferenceRequest(model_name=names.DECODER, requested_output_names=[names.LOGITS], inputs=inputs,
                            preferred_memory=pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0)).exec()
    assert pb.get_output_tensor_by_name(r, names.LOGITS).as_numpy().shape[:2] == (1, 1)


# ------------------------------------------------------------------ a new version, switched atomically
class _FailOn:
    """A store whose write of one key fails: a deploy killed half way."""

    def __init__(self, store, key):
        self.store, self.key = store, key

    def __getattr__(self, a):
        return getattr(self.store, a)

    def put_bytes(self, key, data):
        if key == self.key:
            raise RuntimeError(f"killed while writing {key}")
        self.store.put_bytes(key, data)


def test_publish_adds_a_version_and_switches_with_the_ensemble_config(exported_repo, store_uri):
    from captioner.io.storage import open_store

    repo, _ = exported_repo
    store = open_store(store_uri, create=True)
    assert triton_repo.publish_version(repo, store) == 1
    keys, read = listing_from_store(store)
    v1 = load_listing(keys, read)
    assert plan_load(v1, LOAD_ORDER, read) and v1[names.ENSEMBLE].selected == [1]
    # a second deploy killed just before the switch: still version 1, complete, everywhere
    with pytest.raises(RuntimeError, match="killed"):
        triton_repo.publish_version(repo, _FailOn(store, f"{names.ENSEMBLE}/{CONFIG}"))
    keys, read = listing_from_store(store)
    mid = load_listing(keys, read)
    plan_load(mid, LOAD_ORDER, read)
    assert [s.model_version for s in mid[names.ENSEMBLE].config.ensemble_scheduling.step] == [1, 1, 1]
    assert f"decode_loop/1/{names.DECODER_GRAPH_FILE}" in keys
    assert mid[names.DECODER].selected == [1, 2]  # version 2 is complete before anything points at it
    # the next deploy completes: every step and the BLS decoder pinned to the new version
    n = triton_repo.publish_version(repo, store)
    keys, read = listing_from_store(store)
    new = load_listing(keys, read)
    plan_load(new, LOAD_ORDER, read)
    assert [s.model_version for s in new[names.ENSEMBLE].config.ensemble_scheduling.step] == [n] * 3
    assert read(f"decode_loop/{n}/{names.DECODER_GRAPH_FILE}") == (repo / names.DECODE_LOOP / "1" /
                                                                   names.DECODER_GRAPH_FILE).read_bytes()
    assert new[names.ENSEMBLE].selected == [n] and max(new[names.DECODER].selected) == n


# ------------------------------------------------------------------ deploy through the protected control API
def test_deploy_loads_the_ensemble_through_the_protected_control_api(exported_repo, tmp_path, monkeypatch):
    from captioner.io.storage import open_store
    from captioner.pipeline.steps import deploy_step

    serving = tmp_path / "serving"
    serving.mkdir()
    key = uuid.uuid4().hex
    p, url = start_serve(serving, tmp_path / "serve.log", "--model-control-mode", "explicit",
                         "--grpc-restricted-protocol", f"model-repository:{CONTROL_HEADER}={key}", ready_model=None)
    try:
        c = grpcclient.InferenceServerClient(url)
        triton_repo.publish_version(exported_repo[0], open_store(str(serving)))
        # tritonserver checks the gRPC metadata key "triton-grpc-protocol-" + KEY (server
        # src/grpc/grpc_server.h kRestrictedProtocolHeaderTemplate); the bare KEY is refused even
        # with the right value (what the real server answers, tests/serving/test_triton_server.py)
        grpc_header = "triton-grpc-protocol-" + CONTROL_HEADER
        for bad in (None, {grpc_header: "wrong"}, {CONTROL_HEADER: key}):
            with pytest.raises(InferenceServerException, match=f"This protocol is restricted, expecting header "
                                                               f"'{grpc_header}'") as e:
                c.load_model(names.ENSEMBLE, headers=bad)
            assert e.value.status() == str(grpc.StatusCode.UNAVAILABLE)
        assert not c.is_model_ready(names.ENSEMBLE)
        img = (tmp_path / "x.png")
        from PIL import Image

        Image.new("RGB", (40, 40), (200, 30, 30)).save(img)
        from captioner.serving.client import caption_bytes

        # the deploy step: new version, the ensemble loaded with the key from the env (the Secret)
        monkeypatch.setenv(CONTROL_KEY_ENV, key)
        r = deploy_step(str(exported_repo[0]), str(serving), 1.5, triton_url=url)
        assert r["version"] == 2 and r["replicas"] == [url]
        assert json.loads((serving / "champion.json").read_text())["version"] == 2
        assert c.is_model_ready(names.ENSEMBLE, "2")
        assert not c.is_model_ready(names.DECODER)  # no BLS target: the decoder is not needed
        assert caption_bytes(url, [img.read_bytes()])[0]
    finally:
        p.terminate()
        p.wait(timeout=30)


# ------------------------------------------------------------------ one request path (Triton model and local server)
@pytest.mark.parametrize("beam, needle", [
    (np.array([[1], [3]], np.int32), "BEAM_SIZE must be the same for every image of a request, got [1, 3]"),
    (np.array([[99], [99]], np.int32), "BEAM_SIZE must be between 1 and 8, got 99"),
])
def test_serve_and_triton_decode_loop_answer_a_request_the_same_way(exported_repo, monkeypatch, beam, needle):
    """Both servers run serving.core.caption_requests: a request mixing BEAM_SIZE values is
    refused by both (Triton's model used to take the first value silently)."""
    from captioner.serving.server.runtime import Repository

    repo, _ = exported_repo
    s = DecodeSettings.load(repo / names.DECODE_LOOP / "1")
    cross = np.random.default_rng(0).standard_normal((2, 2 * s.n_layers, s.n_heads, 16, s.head_dim)).astype(np.float32)
    triton = load_model_py(repo, names.DECODE_LOOP, monkeypatch)
    out = triton.execute([pb_utils_double.FakeRequest(cross_kv=cross, BEAM_SIZE=beam),
                          pb_utils_double.FakeRequest(cross_kv=cross)])
    assert needle in out[0].error().message() and not out[1].has_error()
    local = Repository(repo, control="explicit", load=list(LOAD_ORDER))
    try:
        with pytest.raises(Exception, match=re.escape(needle)):
            local.run(names.DECODE_LOOP, {names.CROSS_KV: cross, names.BEAM_SIZE: beam})
        want = pb_utils_double.get_output_tensor_by_name(out[1], names.CAPTION).as_numpy()
        assert (local.run(names.DECODE_LOOP, {names.CROSS_KV: cross})[names.CAPTION] == want).all()
    finally:
        local.close()


def test_deploy_loads_every_replica_and_records_the_champion_only_after(exported_repo, tmp_path, monkeypatch):
    """One load through the Service reaches one pod only; here two servers (replicas of the
    same serving folder) both get the new version, and a replica that cannot be loaded leaves
    the champion record unchanged."""
    from captioner.io.storage import open_store
    from captioner.pipeline.steps import deploy_step, triton_endpoints
    from tests.helpers import free_port

    serving = tmp_path / "serving"
    triton_repo.publish_version(exported_repo[0], open_store(str(serving)))
    key = uuid.uuid4().hex
    monkeypatch.setenv(CONTROL_KEY_ENV, key)
    flags = ("--model-control-mode", "explicit", "--load-model", names.ENSEMBLE,
             "--grpc-restricted-protocol", f"model-repository:{CONTROL_HEADER}={key}")
    procs = [start_serve(serving, tmp_path / f"replica{i}.log", *flags) for i in range(2)]
    try:
        urls = [u for _, u in procs]
        assert triton_endpoints(",".join(urls)) == urls
        assert triton_endpoints(f"localhost:{urls[0].split(':')[1]}") == [urls[0]]
        dead = f"127.0.0.1:{free_port()}"
        with pytest.raises(Exception):
            deploy_step(str(exported_repo[0]), str(serving), 2.0, triton_url=f"{urls[0]},{dead}")
        assert not (serving / "champion.json").exists()
        r = deploy_step(str(exported_repo[0]), str(serving), 2.0, triton_url=",".join(urls))
        assert r["replicas"] == urls and r["version"] == 3
        for u in urls:
            assert grpcclient.InferenceServerClient(u).is_model_ready(names.ENSEMBLE, "3")
        assert json.loads((serving / "champion.json").read_text())["version"] == 3
    finally:
        for p, _ in procs:
            p.terminate()
            p.wait(timeout=30)
