"""The Triton model repository contract, in one place: building, writing and reading the
`config.pbtxt` files, and deciding, from an object *listing* (what S3 returns: objects only,
no folders), which models Triton would load and why it would refuse one.

Used by `captioner export` (writes), `captioner serve` (refuses what Triton refuses), the
deploy step (publishes a new numeric version and loads in dependency order) and the tests.
It imports no torch/onnx export code.

Triton's rules applied here, followed from triton-inference-server/core (r24.10, the release
deployment.TRITON_RELEASE pins; unchanged in r25.01 for what is cited):
- src/model_repository_manager/model_repository_manager.cc (`Poll`, `LoadModelByDependency`,
  `DependencyGraph::UpdateGraph`): every sub-folder of the repository root is a model; files at
  the root are ignored; an ensemble's `ensemble_scheduling.step[*].model_name` are its
  dependencies and are loaded with it; a model's own config name must equal its folder.
  Models reached through BLS are *not* dependencies: in explicit mode they are loaded only
  when named (`--load-model` / RepositoryModelLoad). Our decode_loop makes no BLS call (it
  runs the decoder graph shipped in its own version folder in process), so loading the
  ensemble loads everything that serves a caption; the `decoder` model stays in the
  repository for direct use and is loaded only when named.
- src/model_config_utils.cc (`GetModelVersionFromPath`) and
  src/model_repository_manager/model_lifecycle.cc (`VersionsToLoad`, `AsyncLoad`): versions are the sub-folders whose names parse as
  integers; the version policy (default `latest { num_versions: 1 }`) selects among them;
  "at least one version must be available under the version policy of model '<name>'".
  An S3 "folder" exists only if an object lies under it, so an empty `1/` is no version.
- src/ensemble_scheduler/ensemble_utils.cc (`ValidateEnsembleConfig`): every step model
  must exist, and a pinned step `model_version` must be one that model loads.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from captioner.core.limits import MAX_BATCH, MAX_BEAM
from captioner.core.names import (BEAM_SIZE, CAPTION, CROSS_KV, DECODE_FILE, DECODE_LOOP, DECODER, DECODER_GRAPH_FILE,
                                  ENCODER, ENCODER_HIDDEN, ENSEMBLE, IMAGE, INPUT_IDS, LOGITS, MAX_TOKENS,
                                  ONNX_MODEL_FILE, PAST_KV, PIXEL_VALUES, PREPROCESS, PREPROCESS_FILE, PRESENT_KV,
                                  SELECT_ROWS_FILE)

CONFIG = "config.pbtxt"
REPOSITORY_MARKER = "captioner-repository.json"  # at the root of every repository `captioner export` writes
VERSION_README = "README.md"  # in every version folder, so the folder exists on S3 (an empty `captioner/1/` is no object)
ALL_MODELS = (ENSEMBLE, PREPROCESS, ENCODER, DECODER, DECODE_LOOP)
# Files a Python-backend model's `initialize` opens from its own version folder; without them
# Triton's load of that model fails (python_backend: an exception in initialize fails the load).
VERSION_FILES = {DECODE_LOOP: (DECODER_GRAPH_FILE, SELECT_ROWS_FILE, DECODE_FILE), PREPROCESS: (PREPROCESS_FILE,)}
# What a deploy loads in explicit mode: the ensemble, which brings preprocess, encoder and
# decode_loop as its dependencies.
LOAD_ORDER = (ENSEMBLE,)


# Triton's reason when a version policy selects no version folder (core src/model_lifecycle.cc);
# the one repository refusal that tritonserver answers INVALID_ARGUMENT to a load request (the
# others fail while it polls the repository: INTERNAL, "failed to poll from model repository").
NO_VERSION = "at least one version must be available under the version policy"


class RepositoryError(ValueError):
    """Triton would refuse to load this model; the message gives Triton's reason."""


# ------------------------------------------------------------------ configs: build / write / read
def _io(cls, name, dtype, dims, optional=False):
    t = cls(name=name, data_type=getattr(mc, dtype), dims=list(dims))
    if optional:
        t.optional = True
    return t


def build_configs(d, kind: str = "KIND_GPU", max_batch: int = MAX_BATCH) -> dict[str, mc.ModelConfig]:
    """d: the graph dimensions (C, H, W, P, D, L, heads, Dh, V attributes)."""
    gpu = getattr(mc.ModelInstanceGroup, kind)
    cpu = mc.ModelInstanceGroup.KIND_CPU
    I, O = mc.ModelInput, mc.ModelOutput
    kv = [2 * d.L, d.heads, d.P, d.Dh]
    past = [2 * d.L, d.heads, -1, d.Dh]
    batching = mc.ModelDynamicBatching(max_queue_delay_microseconds=2000)
    cfgs = {
        PREPROCESS: mc.ModelConfig(
            name=PREPROCESS, backend="python", max_batch_size=max_batch,
            input=[_io(I, IMAGE, "TYPE_STRING", [1])], output=[_io(O, PIXEL_VALUES, "TYPE_FP32", [d.C, d.H, d.W])],
            instance_group=[mc.ModelInstanceGroup(kind=cpu, count=2)], dynamic_batching=batching),
        ENCODER: mc.ModelConfig(
            name=ENCODER, backend="onnxruntime", max_batch_size=max_batch,
            input=[_io(I, PIXEL_VALUES, "TYPE_FP32", [d.C, d.H, d.W])],
            output=[_io(O, ENCODER_HIDDEN, "TYPE_FP32", [d.P, d.D]), _io(O, CROSS_KV, "TYPE_FP32", kv)],
            instance_group=[mc.ModelInstanceGroup(kind=gpu, count=1)], dynamic_batching=batching),
        DECODER: mc.ModelConfig(
            name=DECODER, backend="onnxruntime", max_batch_size=max_batch * MAX_BEAM,
            input=[_io(I, INPUT_IDS, "TYPE_INT64", [-1]), _io(I, CROSS_KV, "TYPE_FP32", kv),
                   _io(I, PAST_KV, "TYPE_FP32", past)],
            output=[_io(O, LOGITS, "TYPE_FP32", [-1, d.V]), _io(O, PRESENT_KV, "TYPE_FP32", past)],
            instance_group=[mc.ModelInstanceGroup(kind=gpu, count=1)]),
        DECODE_LOOP: mc.ModelConfig(
            name=DECODE_LOOP, backend="python", max_batch_size=max_batch,
            input=[_io(I, CROSS_KV, "TYPE_FP32", kv), _io(I, BEAM_SIZE, "TYPE_INT32", [1], optional=True),
                   _io(I, MAX_TOKENS, "TYPE_INT32", [1], optional=True)],
            output=[_io(O, CAPTION, "TYPE_STRING", [1])],  # runs the decoder graph in process: on the GPU
            instance_group=[mc.ModelInstanceGroup(kind=gpu, count=1)], dynamic_batching=batching),
    }
    S = mc.ModelEnsembling.Step
    cfgs[ENSEMBLE] = mc.ModelConfig(
        name=ENSEMBLE, platform="ensemble", max_batch_size=max_batch,
        input=[_io(I, IMAGE, "TYPE_STRING", [1]), _io(I, BEAM_SIZE, "TYPE_INT32", [1], optional=True),
               _io(I, MAX_TOKENS, "TYPE_INT32", [1], optional=True)],
        output=[_io(O, CAPTION, "TYPE_STRING", [1])],
        ensemble_scheduling=mc.ModelEnsembling(step=[
            S(model_name=PREPROCESS, model_version=-1, input_map={IMAGE: IMAGE}, output_map={PIXEL_VALUES: PIXEL_VALUES}),
            S(model_name=ENCODER, model_version=-1, input_map={PIXEL_VALUES: PIXEL_VALUES},
              output_map={CROSS_KV: CROSS_KV}),
            S(model_name=DECODE_LOOP, model_version=-1,
              input_map={CROSS_KV: CROSS_KV, BEAM_SIZE: BEAM_SIZE, MAX_TOKENS: MAX_TOKENS},
              output_map={CAPTION: CAPTION}),
        ]))
    return cfgs


def config_text(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def parse_config(text: str | bytes, where: str = CONFIG) -> mc.ModelConfig:
    try:
        return text_format.Parse(text.decode() if isinstance(text, bytes) else text, mc.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as e:
        raise RepositoryError(f"{where}: not a valid ModelConfig: {e}") from None


def read_config(path: str | Path) -> mc.ModelConfig:
    return parse_config(Path(path).read_text(), str(path))


def autocomplete(cfg: mc.ModelConfig) -> mc.ModelConfig:
    """The config as tritonserver answers it after loading (ModelConfig RPC, /config): the
    defaults core fills in (src/model_config_utils.cc NormalizeModelConfig: version policy
    latest 1, pinned input/output memory, preferred batch size = max_batch_size under dynamic
    batching, instance groups named <model>_<i>; an ensemble gets an empty transaction policy)
    and the backend's default model file name (python_backend "model.py", onnxruntime
    backend "model.onnx"). Compared field by field with the real server in
    tests/serving/test_triton_server.py."""
    out = mc.ModelConfig()
    out.CopyFrom(cfg)
    if not out.HasField("version_policy"):
        out.version_policy.latest.num_versions = 1
    if out.platform == "ensemble":
        out.model_transaction_policy.SetInParent()
        return out
    if out.backend == "onnxruntime" and not out.platform:  # core fills the legacy platform name
        out.platform = "onnxruntime_onnx"
    for i, g in enumerate(out.instance_group):
        g.name = g.name or f"{out.name}_{i}"
    if not out.default_model_filename:
        out.default_model_filename = {"python": "model.py", "onnxruntime": ONNX_MODEL_FILE}.get(out.backend, "")
    if out.HasField("dynamic_batching") and not out.dynamic_batching.preferred_batch_size and out.max_batch_size:
        out.dynamic_batching.preferred_batch_size.append(out.max_batch_size)
    if not out.optimization.HasField("input_pinned_memory"):
        out.optimization.input_pinned_memory.enable = True
    if not out.optimization.HasField("output_pinned_memory"):
        out.optimization.output_pinned_memory.enable = True
    return out


def write_configs(repo: Path, cfgs: dict[str, mc.ModelConfig], version: int = 1) -> None:
    """Each model's config.pbtxt, and a README in its version folder: S3 has no empty folders,
    and Triton needs at least one version folder per model (else it refuses the model: no version
    available under the version policy)."""
    for name, cfg in cfgs.items():
        vdir = repo / name / str(version)
        vdir.mkdir(parents=True, exist_ok=True)
        (repo / name / CONFIG).write_text(config_text(cfg))
        readme = vdir / VERSION_README
        if not readme.exists():
            readme.write_text(f"Version {version} of Triton model '{name}', written by `captioner export`.\n")


def write_marker(repo: Path, info: dict) -> None:
    (repo / REPOSITORY_MARKER).write_text(json.dumps({"models": sorted(ALL_MODELS), **info}, indent=2))


# ------------------------------------------------------------------ repository from a listing
@dataclass
class Model:
    name: str
    config: mc.ModelConfig | None
    versions: dict[int, list[str]]  # version -> object keys under it (relative to the model folder)
    error: str | None = None  # why Triton would refuse to load it
    selected: list[int] = field(default_factory=list)  # versions the policy loads


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def versions_to_load(cfg: mc.ModelConfig, available: Iterable[int]) -> list[int]:
    """Triton's VersionsToLoad (core src/model_lifecycle.cc): latest N (default 1), all, or specific."""
    avail = sorted(set(available), reverse=True)
    pol = cfg.version_policy
    which = pol.WhichOneof("policy_choice")
    if which == "all":
        return sorted(avail)
    if which == "specific":
        return sorted(v for v in set(pol.specific.versions) if v in avail)
    n = pol.latest.num_versions if which == "latest" and pol.latest.num_versions > 0 else 1
    return sorted(avail[:n])


def load_listing(keys: Iterable[str], read: Callable[[str], bytes]) -> dict[str, Model]:
    """Models of a repository given only its object keys (relative to the repository root)
    and a way to read one object. A model Triton would refuse gets `error` (not raised:
    Triton refuses only the models it is asked to load)."""
    by_model: dict[str, list[str]] = {}
    for k in keys:
        k = k.lstrip("/")
        parts = k.split("/")
        if len(parts) < 2 or not parts[0] or parts[0].startswith("."):
            continue  # files at the root (export_report.json, the marker...) are not models
        by_model.setdefault(parts[0], []).append(posixpath.join(*parts[1:]))
    models: dict[str, Model] = {}
    for name, rel in sorted(by_model.items()):
        versions: dict[int, list[str]] = {}
        for r in rel:
            head, _, tail = r.partition("/")
            if tail and _is_int(head):
                versions.setdefault(int(head), []).append(tail)
        m = Model(name, None, versions)
        models[name] = m
        if CONFIG not in rel:
            m.error = f"failed to load '{name}': {name}/{CONFIG} not found (required for python and ensemble models)"
            continue
        try:
            m.config = parse_config(read(f"{name}/{CONFIG}"), f"{name}/{CONFIG}")
        except RepositoryError as e:
            m.error = f"failed to load '{name}': {e}"
            continue
        if m.config.name and m.config.name != name:
            m.error = (f"failed to load '{name}': unexpected model name '{m.config.name}' in {name}/{CONFIG} "
                       f"(it must equal the folder name '{name}')")
            continue
        m.selected = versions_to_load(m.config, versions)
        if not m.selected:
            m.error = (f"load failed for model '{name}': {NO_VERSION} "
                       f"of model '{name}' (numeric version folders holding objects: {sorted(versions) or 'none'})")
            continue
        for v in m.selected:
            missing = [f for f in VERSION_FILES.get(name, ()) if f not in versions[v]]
            if missing:
                m.error = (f"failed to load '{name}': version {v} lacks {', '.join(missing)}, which its initialize() "
                           f"opens from its own version folder")
                break
    return models


def listing_from_dir(root: str | Path) -> tuple[list[str], Callable[[str], bytes]]:
    """A local folder seen the way S3 sees it: files only (an empty folder does not exist)."""
    root = Path(root)
    keys = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
    return keys, lambda k: (root / k).read_bytes()


def listing_from_store(store) -> tuple[list[str], Callable[[str], bytes]]:
    """Keys and reader of a `captioner.io.storage.Store` (local folder or S3 prefix)."""
    return store.list(""), store.get_bytes


def plan_load(models: dict[str, Model], requested: Iterable[str], read: Callable[[str], bytes] | None = None) -> list[str]:
    """Models Triton loads for `requested` (explicit mode: the named models plus ensemble
    steps, dependencies first), or RepositoryError with Triton's reason. No model calls another
    through BLS (decode_loop runs its decoder in process), so nothing else needs loading."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise RepositoryError(f"circular ensemble dependency: {' -> '.join(path + (name,))}")
        m = models.get(name)
        if m is None:
            where = f" (needed by ensemble '{path[-1]}')" if path else ""
            raise RepositoryError(f"failed to load '{name}': model not found in any model repository{where}")
        if m.error:
            raise RepositoryError(m.error + (f" (needed by ensemble '{path[-1]}')" if path else ""))
        if m.config.platform == "ensemble":
            for step in m.config.ensemble_scheduling.step:
                visit(step.model_name, path + (name,))
                dep = models[step.model_name]
                if step.model_version != -1 and step.model_version not in dep.selected:
                    raise RepositoryError(
                        f"failed to load '{name}': ensemble step model '{step.model_name}' version "
                        f"{step.model_version} is not available (loaded versions: {dep.selected})")
        order.append(name)

    for name in requested:
        visit(name, ())
    return order


def check_repository(root: str | Path, load: Iterable[str] = ALL_MODELS) -> dict[str, Model]:
    """Refuse (RepositoryError) a local repository Triton would refuse for `load`."""
    if not Path(root).is_dir():
        raise RepositoryError(f"failed to stat file {root}: the model repository does not exist")
    keys, read = listing_from_dir(root)
    models = load_listing(keys, read)
    plan_load(models, load, read)
    return models


# ------------------------------------------------------------------ deploy: a new numeric version, switched atomically
def next_version(models: dict[str, Model]) -> int:
    return 1 + max((v for m in models.values() for v in m.versions), default=0)


def publish_version(local: str | Path, store, keep: int = 2) -> int:
    """Publish an exported repository (version 1 of each model, as `captioner export` writes
    it) into a serving store as a new numeric version N, without a moment at which Triton
    could load a partly written or mixed model:
    1. every file goes to `<model>/N/...` while the configs still pin the previous versions
       (`version_policy: specific`), so no loader looks at N yet;
    2. the component configs are rewritten to load [previous, N] (both complete);
    3. the ensemble config, pinning every step to N, is written last: one object PUT is the
       switch. decode_loop N carries its own decoder graph. Versions older than the
       last `keep` are deleted afterwards (Triton copies a model from S3 when loading it)."""
    local = Path(local)
    lkeys, lread = listing_from_dir(local)
    new = load_listing(lkeys, lread)
    plan_load(new, ALL_MODELS, lread)  # refuse to publish what Triton would refuse
    skeys, sread = listing_from_store(store)
    old = load_listing(skeys, sread)
    n = next_version(old)
    prev = {name: [v for v in (m.selected if not m.error else []) if v != n] for name, m in old.items()}
    # 1. the new version's files (configs untouched)
    for name, m in new.items():
        for rel in m.versions[1]:
            store.put_bytes(f"{name}/{n}/{rel}", lread(f"{name}/1/{rel}"))
    # 2. component configs: previous and new versions loadable
    for name in [x for x in new if x != ENSEMBLE]:
        cfg = mc.ModelConfig()
        cfg.CopyFrom(new[name].config)
        cfg.version_policy.specific.versions[:] = sorted(set(prev.get(name, [])[-(keep - 1):] + [n])) if keep > 1 else [n]
        store.put_bytes(f"{name}/{CONFIG}", config_text(cfg).encode())
    # 3. the switch
    ens = mc.ModelConfig()
    ens.CopyFrom(new[ENSEMBLE].config)
    ens.version_policy.specific.versions[:] = [n]
    for step in ens.ensemble_scheduling.step:
        step.model_version = n
    store.put_bytes(f"{ENSEMBLE}/{CONFIG}", config_text(ens).encode())
    for k in lkeys:  # non-model files at the root (report, marker, training config)
        if "/" not in k:
            store.put_bytes(k, lread(k))
    # old versions nobody loads any more
    for name, m in old.items():
        keepv = set(prev.get(name, [])[-(keep - 1):]) if keep > 1 else set()
        for v, rels in m.versions.items():
            if v != n and v not in keepv:
                for rel in rels:
                    store.delete(f"{name}/{v}/{rel}")
    return n


def pin_ensemble(store, version: int) -> None:
    """Point the served repository back at `version` (a rollback): one PUT of the ensemble
    config with its version and every step pinned to `version`, as publish_version's switch
    does. Refused (RepositoryError) unless every step model still loads that version, so the
    repository never pins something Triton would refuse."""
    keys, read = listing_from_store(store)
    models = load_listing(keys, read)
    if ENSEMBLE not in models or models[ENSEMBLE].error:
        raise RepositoryError(f"cannot pin {ENSEMBLE} to version {version}: no loadable {ENSEMBLE} in the repository")
    ens = mc.ModelConfig()
    ens.CopyFrom(models[ENSEMBLE].config)
    if version not in models[ENSEMBLE].versions:
        raise RepositoryError(f"cannot pin {ENSEMBLE} to version {version}: versions present "
                              f"{sorted(models[ENSEMBLE].versions)}")
    for step in ens.ensemble_scheduling.step:
        dep = models.get(step.model_name)
        if dep is None or dep.error or version not in dep.selected:
            raise RepositoryError(f"cannot pin {ENSEMBLE} to version {version}: step model '{step.model_name}' "
                                  f"does not load it (loaded versions: {dep.selected if dep else []})")
        step.model_version = version
    ens.version_policy.specific.versions[:] = [version]
    store.put_bytes(f"{ENSEMBLE}/{CONFIG}", config_text(ens).encode())
