"""The model runtime of `captioner serve`: the models of an exported repository that Triton
would load, held and run in process. The ONNX models run in onnxruntime, the Python-backend
logic is the same `captioner.serving.core` functions Triton's Python models call, and the
ensemble's requests are decoded in the decode pool and run in dynamic batches
(`captioner.serving.server.batching`)."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Iterable

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from captioner.core.names import (BEAM_SIZE, CROSS_KV, DECODE_LOOP, DECODER, ENCODER, ENCODER_HIDDEN, ENSEMBLE, IMAGE,
                                  INPUT_IDS, LOGITS, MAX_TOKENS, ONNX_MODEL_FILE, PAST_KV, PIXEL_VALUES, PREPROCESS,
                                  PRESENT_KV)
from captioner.serving import triton_repo
from captioner.serving.core import DecodeLoop, caption_requests, load_preprocess, params_for, request_int
from captioner.serving.onnx_runtime import session
from captioner.serving.server.batching import Batcher, BatchTimer, DecodePool
from captioner.serving.server.errors import Deadline, NotFound
from captioner.serving.server.stats import Statistics

log = logging.getLogger(__name__)


class Repository:
    """The models of an exported repository that Triton would load, runnable in process.

    Loading follows `captioner.serving.triton_repo` (Triton's rules, from the object listing):
    model-control mode "none" loads every model and refuses to start if Triton would refuse
    one (Triton's default --exit-on-error); "explicit" loads only what `load()` names plus
    ensemble steps. The decode loop runs its own in-process decoder session (the graph in
    its version folder), as Triton's decode_loop model does: no call to the `decoder` model."""

    def __init__(self, repo: str | Path, threads: int = 0, control: str = "none", load: Iterable[str] = ()):
        self.path = Path(repo)
        self.threads = threads
        self.control = control
        self.decode_pool = DecodePool()
        self.lock = threading.Lock()
        self.stats = Statistics()  # every model's executions here, requests' outcomes by the data plane
        self.models: dict[str, triton_repo.Model] = {}
        self.loaded: dict[str, list[int]] = {}
        self.unloaded: dict[str, list[int]] = {}  # versions of models unloaded through the control API
        self._cache: dict[tuple[str, int], object] = {}
        self.batcher: Batcher | None = None
        if not self.path.is_dir():
            raise triton_repo.RepositoryError(f"failed to stat file {self.path}: the model repository does not exist")
        if control == "none":
            keys, read = triton_repo.listing_from_dir(self.path)
            self.load(sorted(triton_repo.load_listing(keys, read)))
        elif control == "explicit":
            for name in load:
                self.load([name])
        else:
            raise ValueError(f"model control mode must be 'none' or 'explicit', got {control!r}")

    @property
    def configs(self) -> dict[str, mc.ModelConfig]:
        return {n: self.models[n].config for n in self.loaded}

    # -- model control (Triton re-reads the repository on every load)
    def load(self, names: list[str]) -> list[str]:
        keys, read = triton_repo.listing_from_dir(self.path)
        models = triton_repo.load_listing(keys, read)
        with self.lock:
            order = triton_repo.plan_load(models, names, read)
            for n in order:  # build every runner before switching, so a failed load changes nothing
                for v in models[n].selected:
                    self._runner(n, v, models, fresh=True)
            self.models.update({n: models[n] for n in order})
            for n in order:
                self.loaded[n] = models[n].selected
                self.unloaded.pop(n, None)
            if ENSEMBLE in order:
                ens = models[ENSEMBLE].config
                delay = ens.dynamic_batching.max_queue_delay_microseconds / 1e6 \
                    if ens.HasField("dynamic_batching") else 0.002
                # the ensemble's batches, timed for the queue/compute statistics
                old, self.batcher = self.batcher, Batcher(BatchTimer(self._ensemble_batch), ens.max_batch_size,
                                                          max(delay, 0.002),
                                                          ENSEMBLE)
                if old is not None:
                    old.stop()
        log.info("loaded %s", ", ".join(f"{n} (versions {self.loaded[n]})" for n in order))
        return order

    def unload(self, name: str) -> None:
        with self.lock:
            if name not in self.loaded:
                raise NotFound(name)
            self.unloaded[name] = self.loaded.pop(name)
            if name == ENSEMBLE and self.batcher is not None:
                self.batcher.stop()
                self.batcher = None
        log.info("unloaded %s", name)

    def version(self, model: str, version: int = -1) -> int:
        """The loaded version that serves a request for `version` (-1: the latest loaded),
        or NotFound with Triton's message."""
        vs = self.loaded.get(model)
        if not vs or (version != -1 and version not in vs):
            what = f"'{model}'" + (f" version {version}" if version != -1 else "")
            raise NotFound(f"Request for unknown model: {what} is not found")
        return max(vs) if version == -1 else version

    def _runner(self, model: str, v: int, models=None, fresh: bool = False):
        key = (model, v)
        if key in self._cache and not fresh:
            return self._cache[key]
        d = self.path / model / str(v)
        if model in (ENCODER, DECODER):
            r = session(d / ONNX_MODEL_FILE, self.threads)
        elif model == PREPROCESS:
            r = load_preprocess(d)
        elif model == DECODE_LOOP:
            r = DecodeLoop.in_process(d, self.threads)  # its own decoder session, as in Triton
        else:
            r = None
        self._cache[key] = r
        return r

    def _steps(self) -> dict[str, int]:
        """The versions the loaded ensemble runs (its pinned step versions, else the latest)."""
        return {st.model_name: self.version(st.model_name, st.model_version)
                for st in self.models[ENSEMBLE].config.ensemble_scheduling.step}

    # -- model runners: inputs dict name -> np.ndarray (with batch dim) -> outputs dict
    def run(self, model: str, inputs: dict[str, np.ndarray], version: int = -1,
            deadline: Deadline | None = None) -> dict[str, np.ndarray]:
        v = self.version(model, version)
        out = self._run(model, v, inputs, deadline or Deadline())
        # the ensemble's executions are its dynamic batches, counted in _ensemble_batch
        self.stats.executed(model, v, len(next(iter(inputs.values()))) if inputs else 0, 0 if model == ENSEMBLE else 1)
        return out

    def _run(self, model: str, v: int, inputs: dict[str, np.ndarray], deadline: Deadline) -> dict[str, np.ndarray]:
        if model == ENSEMBLE:
            steps = self._steps()
            loop = self._runner(DECODE_LOOP, steps[DECODE_LOOP])
            params_for(request_int(inputs, BEAM_SIZE), request_int(inputs, MAX_TOKENS), loop.s)  # refuse before decoding
            pixels = self.decode_pool.pixels(inputs[IMAGE], self._runner(PREPROCESS, steps[PREPROCESS]), deadline)
            self.stats.executed(PREPROCESS, steps[PREPROCESS], len(pixels), 1)  # one preprocess execution per request
            batcher = self.batcher
            if batcher is None:
                raise NotFound(f"Request for unknown model: '{ENSEMBLE}' is not found")
            if BatchTimer.KEY in inputs:  # the data plane's timing record: queued from here
                inputs[BatchTimer.KEY]["submit"] = time.monotonic()
            return deadline.wait(batcher.submit({**inputs, PIXEL_VALUES: pixels}, len(pixels), deadline))
        r = self._runner(model, v)
        if model == PREPROCESS:
            return {PIXEL_VALUES: self.decode_pool.pixels(inputs[IMAGE], r, deadline)}
        if model == ENCODER:
            hidden, cross = r.run([ENCODER_HIDDEN, CROSS_KV], {PIXEL_VALUES: inputs[PIXEL_VALUES].astype(np.float32)})
            return {ENCODER_HIDDEN: hidden, CROSS_KV: cross}
        if model == DECODER:
            return dict(zip([LOGITS, PRESENT_KV], r.run([LOGITS, PRESENT_KV], {
                INPUT_IDS: inputs[INPUT_IDS], CROSS_KV: inputs[CROSS_KV], PAST_KV: inputs[PAST_KV]})))
        if model == DECODE_LOOP:
            res = caption_requests(r, [inputs])[0]
            if isinstance(res, Exception):
                raise res
            return res
        raise NotFound(model)

    def _ensemble_batch(self, items: list[dict]) -> list:
        """encoder -> decode_loop for many requests at once (their images were decoded by the
        decode pool into PIXEL_VALUES); a request that fails fails alone. The decode-loop step is
        serving.core.caption_requests, as in Triton. One execution of the ensemble (its rows are
        counted per request, in run())."""
        self.stats.executed(ENSEMBLE, self.version(ENSEMBLE), 0, 1)
        steps = self._steps()
        enc, loop = self._runner(ENCODER, steps[ENCODER]), self._runner(DECODE_LOOP, steps[DECODE_LOOP])
        pixels = [inp[PIXEL_VALUES] for inp in items]
        _, cross = enc.run([ENCODER_HIDDEN, CROSS_KV], {PIXEL_VALUES: np.concatenate(pixels)})
        sizes = np.cumsum([0] + [len(x) for x in pixels])
        for step in (ENCODER, DECODE_LOOP):  # each runs once over the whole dynamic batch
            self.stats.executed(step, steps[step], int(sizes[-1]), 1)
        return caption_requests(loop, [{CROSS_KV: cross[a:b], **{k: inp[k] for k in (BEAM_SIZE, MAX_TOKENS) if k in inp}}
                                       for inp, a, b in zip(items, sizes[:-1], sizes[1:])])

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        self.decode_pool.close()
