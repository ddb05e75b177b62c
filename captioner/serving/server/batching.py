"""Work scheduling of `captioner serve`: the decode pool that turns requests' images into pixel
values outside the batcher (a light lane and a heavy lane, so a request of large images cannot
hold up a small one; refused over the request's pixel budget before anything is decoded), and
the dynamic batcher that runs concurrent requests of a model as one batch (Triton's
dynamic_batching: up to max_batch_size rows within the queue delay). Work for a client that
has gone is dropped before decoding and before the model runs.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures

import numpy as np

from captioner.core.limits import HEAVY_DECODERS, LIGHT_DECODERS, LIGHT_REQUEST_PIXELS, REQUEST_PIXEL_BUDGET
from captioner.core.preprocess import SERVING_MAX_PIXELS
from captioner.serving.core import check_pixel_budget, image_bytes_to_pixels
from captioner.serving.server.errors import Deadline, Expired, ShuttingDown
from captioner.serving.server.stats import TIMING

log = logging.getLogger(__name__)


def _settle(f: futures.Future, r) -> None:
    if f.done():
        return
    try:
        f.set_exception(r) if isinstance(r, BaseException) else f.set_result(r)
    except futures.InvalidStateError:
        pass  # settled concurrently (stop() failing what the loop also finished)


class DecodePool:
    """Decodes requests' images outside the batcher thread in two fixed pools: requests of up to
    `light_pixels` in total in the light lane, larger ones (within the request budget) in the heavy
    lane. A request is refused over its pixel budget before anything is decoded; a request whose
    client has gone is not decoded (checked before each image)."""

    def __init__(self, max_pixels: int = SERVING_MAX_PIXELS, budget: int = REQUEST_PIXEL_BUDGET,
                 light_pixels: int = LIGHT_REQUEST_PIXELS):
        self.max_pixels, self.budget, self.light_pixels = max_pixels, budget, light_pixels
        self.light = futures.ThreadPoolExecutor(LIGHT_DECODERS, thread_name_prefix="decode-light")
        self.heavy = futures.ThreadPoolExecutor(HEAVY_DECODERS, thread_name_prefix="decode-heavy")
        self.lock = threading.Lock()
        self.skipped_images = 0

    def pixels(self, images: np.ndarray, pre, deadline: Deadline) -> np.ndarray:
        """`pre`: the preprocessing settings of the preprocess model version that runs."""
        total = check_pixel_budget(images, self.budget, self.max_pixels)
        lane = self.light if total <= self.light_pixels else self.heavy
        try:
            f = lane.submit(self._decode, images, pre, deadline)
        except RuntimeError:  # the pool was shut down
            raise ShuttingDown("server is shutting down: request not run") from None
        return deadline.wait(f)

    def _decode(self, images: np.ndarray, pre, deadline: Deadline) -> np.ndarray:
        n = images.size

        def check(i: int) -> None:
            why = deadline.expired()
            if why:
                with self.lock:
                    self.skipped_images += n - i
                log.info("skipped decoding %d of %d image(s) of a request: %s", n - i, n, why)
                raise Expired(why)

        return image_bytes_to_pixels(images, pre, self.max_pixels, check)

    def close(self) -> None:
        for pool in (self.light, self.heavy):
            pool.shutdown(wait=False, cancel_futures=True)


class Batcher:
    """Collects concurrent requests for up to `delay_s` or until `max_batch` rows, then runs
    `fn(items) -> results` once for all of them (a result may be an Exception). Items whose
    client has gone are dropped before `fn` runs. `stop()` runs what was queued before it and
    fails anything still pending; nothing submitted after it is left waiting."""

    def __init__(self, fn, max_batch: int, delay_s: float, name: str):
        self.fn, self.max_batch, self.delay = fn, max(1, max_batch), delay_s
        self.q: queue.Queue = queue.Queue()
        self.batches = 0
        self.dropped = 0
        self._held = None  # an item that did not fit the last batch: first in the next one
        self._lock = threading.Lock()
        self._stopped = False
        self.thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self.thread.start()

    def submit(self, item, rows: int, deadline: Deadline | None = None) -> futures.Future:
        f: futures.Future = futures.Future()
        with self._lock:  # the stop signal is queued under the same lock: nothing lands behind it
            if self._stopped:
                f.set_exception(ShuttingDown("server is shutting down: request not run"))
                return f
            self.q.put((item, rows, f, deadline))
        return f

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self.q.put(None)
        self.thread.join(timeout=timeout)
        self._fail_pending()  # only if the loop could not finish in time

    def _fail_pending(self) -> None:
        pending = [self._held] if self._held is not None else []
        while True:
            try:
                pending.append(self.q.get_nowait())
            except queue.Empty:
                break
        for x in pending:
            if x is not None:
                _settle(x[2], ShuttingDown("server is shutting down: request not run"))

    def _loop(self) -> None:
        stopping = False
        while True:
            if self._held is not None:
                first, self._held = self._held, None
            elif stopping:
                return  # the stop signal was the last item queued
            else:
                first = self.q.get()
                if first is None:
                    return
            batch, rows = [first], first[1]
            deadline = time.monotonic() + self.delay
            while rows < self.max_batch and not stopping:
                try:
                    nxt = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                elif rows + nxt[1] > self.max_batch:
                    self._held = nxt  # kept here, never re-queued behind a stop signal
                    break
                else:
                    batch.append(nxt)
                    rows += nxt[1]
            self._run(batch)

    def _run(self, batch: list) -> None:
        live = []
        for b in batch:
            why = b[3].expired() if b[3] is not None else None
            if why:
                _settle(b[2], Expired(why))
            else:
                live.append(b)
        if len(live) < len(batch):
            self.dropped += len(batch) - len(live)
            log.info("dropped %d request(s) before the encoder: client gone", len(batch) - len(live))
        if not live:
            return
        self.batches += 1
        try:
            results = self.fn([b[0] for b in live])
        except Exception as e:  # noqa: BLE001
            results = [e] * len(live)
        for b, r in zip(live, results):
            _settle(b[2], r)


class BatchTimer:
    """Wraps a batcher function: records, on each batched item, when its batch started and
    how long it ran (queue time = start - submit; compute time = the batch's run time)."""

    KEY = TIMING

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, items: list[dict]):
        t0 = time.monotonic()
        try:
            return self.fn(items)
        finally:
            t1 = time.monotonic()
            for it in items:
                tm = it.get(self.KEY)
                if tm is not None:
                    tm.update(start=t0, end=t1)
