"""Embedding as a bounded resource: one queue for every request's images, batched across requests,
in small runs, a fixed number of runs at once, memory given back.

A request's images used to go through one ONNX Runtime run (64 photos at 224x224, occlusion in 32s),
with nothing bounding how many ran at once and ORT's CPU arena keeping its high-water mark forever:
8 concurrent 64-image classify calls left a server at 4.45 GB. And each one-image request ran the
model alone, so 16 clients made 16 runs of one image where one run of 8 costs little more.
`GatedEmbedder` wraps the served embedder and sends its images through the `EmbedGate`, a dynamic
batcher in the manner of Triton's (a maximum batch, a short wait for more work, a queue limit):

* a request's images are cut into chunks of at most `max_batch` images (8), queued one chunk at a
  time; a model run takes the queue's head chunk and the chunks behind it *of other requests* on the
  same model, up to `max_batch` images, so concurrent one-image requests share one run and one run's
  activations stay small whatever the traffic;
* at most `slots` runs at once (default: one per core; ORT runs one thread per call); there is no
  worker thread: a waiting request's own thread runs the next batch when a slot frees, and hands
  the other requests their rows;
* when another run is already going (the server is under load) and the batch is not full, the run
  first waits up to `max_delay_s` (1 ms) for more chunks to join; an idle server runs at once, so a
  lone request pays no delay;
* a request is admitted at its first chunk: when `max_waiting` chunks already wait, or it is not
  taken into a run within `wait_s`, it is refused with `ServiceBusy` (503 + Retry-After) instead of
  queueing without bound; an admitted request is finished, its later chunks queued behind
  newcomers' first chunks (a one-image request waits for the runs going now, not for whole 64-image
  requests), and once the request has waited `wait_s` since its admission its later chunks go to
  the front (no starvation: a request of many chunks waits about `wait_s` behind newcomers in all,
  not `wait_s` per chunk, which left 50-image occlusion maps unanswered after 30 s under load);
* a run that fails is retried chunk by chunk, so only the requests whose own images fail get the
  error;
* ONNX Runtime runs with arena shrinkage (`memory.enable_memory_arena_shrinkage`), so the arena
  returns what a run used to the system after the run;
* `HeapTrimmer` gives the C heap's free pages back once the gate has gone idle after work
  (glibc's `malloc_trim`): the request threads' malloc arenas otherwise keep what decoding and
  scoring freed, and a 120 s photos load left a server at 1.4 GB, 950 MB over idle.

Measured (/tmp-built 224x224 RGB Conv-4, 4 threads x 64 images; see the commit): one run of 64 per
call peaked at 4.5 GB and stayed at 4.4 GB; chunks of 8 peaked at 1.0 GB and stayed there; chunks
of 8 with shrinkage peaked at 1.0 GB and went back to 0.48 GB (0.33 GB before). Throughput with
batching: BENCHMARKS.md, "Service throughput".
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fewshot.artifacts.embedders import ONNX_INPUT, ONNX_OUTPUT, Embedder, check_batch
from fewshot.data.imageio import model_input
from fewshot.errors import FewshotError

DEFAULT_CHUNK = 8  # images per model run (the memory bound), and so the largest batch across requests
DEFAULT_MAX_DELAY_S = 0.001  # how long a run waits for more work to join, only while another run is going

Run = Callable[[np.ndarray], np.ndarray]  # uint8 (N, C, H, W) -> (N, D) float32


class ServiceBusy(FewshotError):
    """Too much embedding work is already running or waiting: 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class _Work:
    """One chunk of one request: its images, and once run, its rows (or the error)."""

    model: object  # chunks batch together only with chunks of the same model
    run: Run
    images: np.ndarray  # uint8 (n, C, H, W), n <= max_batch
    first: bool  # the request's first chunk: admission is decided here; served before later chunks
    out: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False
    promoted: bool = field(default=False)


class EmbedGate:
    """The one queue of embedding work, batched across requests (see the module docstring):
    `embed(model, run, images)` returns `run`'s rows for `images`, having run them in a batch of at
    most `max_batch` images with other requests' chunks of the same `model`; at most `slots` runs at
    once; refuses a first chunk (`ServiceBusy`) when `max_waiting` chunks already wait or it waited
    `wait_s`. Waiting chunks are served first come first served, a request's first chunk ahead of
    the later chunks of requests already running."""

    def __init__(self, slots: int = 0, max_waiting: int = 32, wait_s: float = 5.0, *,
                 max_batch: int = DEFAULT_CHUNK, max_delay_s: float = DEFAULT_MAX_DELAY_S) -> None:
        self.slots = slots or max(1, os.cpu_count() or 1)
        if self.slots < 1 or max_waiting < 0 or wait_s < 0 or max_batch < 1 or max_delay_s < 0:
            raise ValueError(f"embed gate: slots {slots}, max_waiting {max_waiting}, wait_s {wait_s}, max_delay_s "
                             f"{max_delay_s} must be >= 0 and max_batch {max_batch} >= 1")
        self.max_waiting, self.wait_s, self.max_batch, self.max_delay_s = max_waiting, wait_s, max_batch, max_delay_s
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # a run ended, a slot freed
        self._more = threading.Condition(lock)  # work was queued (a run waiting for more work to join)
        self._free = self.slots
        self._queues: tuple[deque[_Work], deque[_Work]] = (deque(), deque())  # first chunks, later chunks
        self.refused = 0
        self.queued = 0  # chunks ever queued
        self.runs = 0  # model runs made (a run may hold several requests' chunks)
        self.chunks = 0  # chunks embedded

    @property
    def idle(self) -> bool:
        """No model run going and no chunk waiting."""
        return self._free == self.slots and not self.waiting

    @property
    def waiting(self) -> int:
        """Chunks queued and not yet taken into a run."""
        return len(self._queues[0]) + len(self._queues[1])

    def _busy(self, why: str) -> ServiceBusy:
        self.refused += 1
        return ServiceBusy(f"the server is busy ({why}); retry in a second")

    def _take(self) -> list[_Work]:
        """The queue's head chunk and the chunks behind it of the same model, up to max_batch images."""
        order = [*self._queues[0], *self._queues[1]]
        head = order[0]
        batch, n = [], 0
        for w in order:
            if w.model is head.model and n + len(w.images) <= self.max_batch:
                batch.append(w)
                n += len(w.images)
        for w in batch:
            self._queues[0 if w in self._queues[0] else 1].remove(w)
        return batch

    def _same_model_images(self) -> int:
        order = [*self._queues[0], *self._queues[1]]
        return sum(len(w.images) for w in order if w.model is order[0].model) if order else 0

    def embed(self, model: object, run: Run, images: np.ndarray, *, first: bool = True,
              since: float | None = None) -> np.ndarray:
        """`run(images)`, batched with other waiting chunks of `model` (at most max_batch images in all).
        A later chunk (`first=False`) of a request admitted at `since` (`time.monotonic()`; default
        now) goes to the front once `since + wait_s` has passed."""
        if len(images) > self.max_batch:
            raise ValueError(f"a chunk of {len(images)} images exceeds the batch of {self.max_batch}; cut it first")
        with self._cond:
            if first and self.waiting >= self.max_waiting and not (self._free > 0 and not self.waiting):
                raise self._busy(f"{self.max_waiting} batches of images already wait for the model")
            me = _Work(model, run, images, first)
            now = time.monotonic()
            deadline = (now if first or since is None else min(since, now)) + self.wait_s
            if not first and deadline <= now:  # the request already waited wait_s: the front
                self._queues[0].appendleft(me)
                me.promoted = True
            else:
                self._queues[0 if first else 1].append(me)
            self.queued += 1
            self._more.notify()
            while not me.done:
                if self._free > 0 and self.waiting:
                    self._lead()  # runs a batch (not necessarily holding `me`); the lock is held again after
                    continue
                remaining = deadline - time.monotonic()
                queued = me in self._queues[0] or me in self._queues[1]
                if remaining <= 0 and queued and first:
                    self._queues[0].remove(me)
                    self._cond.notify_all()
                    raise self._busy(f"the images were not taken into a model run within {self.wait_s:g} s")
                if remaining <= 0 and queued and not me.promoted:  # its request waited wait_s: the front
                    self._queues[1].remove(me)
                    self._queues[0].appendleft(me)
                    me.promoted = True
                    continue
                self._cond.wait(remaining if remaining > 0 and queued else None)
        if me.error is not None:
            raise me.error
        assert me.out is not None
        return me.out

    def _lead(self) -> None:
        """Take a slot, wait up to max_delay_s for more chunks while another run is going, run the
        batch outside the lock and hand every chunk its rows. Called and returns with the lock held."""
        self._free -= 1
        try:
            if self.max_delay_s and self._free < self.slots - 1:  # another run is going: the server is loaded
                end = time.monotonic() + self.max_delay_s
                while self._same_model_images() < self.max_batch and (left := end - time.monotonic()) > 0:
                    self._more.wait(left)
            if not self.waiting:  # others took the work meanwhile (slots > 2)
                return
            batch = self._take()
            self._cond.release()
            try:
                self._run(batch)
            finally:
                self._cond.acquire()
            self.runs += 1
            self.chunks += len(batch)
            for w in batch:
                w.done = True
        finally:
            self._free += 1
            self._cond.notify_all()

    @staticmethod
    def _run(batch: list[_Work]) -> None:
        """One model run for the batch; if it fails, each chunk alone, so a chunk that cannot be
        embedded fails only its own request."""
        try:
            out = batch[0].run(np.concatenate([w.images for w in batch]) if len(batch) > 1 else batch[0].images)
            if len(out) != sum(len(w.images) for w in batch):
                raise RuntimeError(f"the model returned {len(out)} rows for {sum(len(w.images) for w in batch)} images")
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            for w in batch:
                EmbedGate._run([w])
            return
        start = 0
        for w in batch:
            w.out, start = out[start:start + len(w.images)], start + len(w.images)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one run slot outside the queue (whatever else must not run beside the model: tests use
        it to stand for someone else's images being embedded)."""
        with self._cond:
            while self._free <= 0:
                self._cond.wait()
            self._free -= 1
        try:
            yield
        finally:
            with self._cond:
                self._free += 1
                self._cond.notify_all()


@functools.cache
def _libc() -> Any:
    """The C library, loaded once (`find_library` runs a subprocess), or None."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _glibc(function: str) -> Any:
    """A glibc function by name (a ctypes function), or None where the C library does not have it."""
    return getattr(_libc(), function, None)


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's `malloc_trim(0)` (give every arena's free pages back to the system), or None where the
    C library is not glibc."""
    import ctypes

    trim = _glibc("malloc_trim")
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


M_ARENA_MAX = -8  # glibc's mallopt parameter: the most malloc arenas the process makes


def limit_malloc_arenas(n: int) -> bool:
    """At most `n` glibc malloc arenas for this process (`mallopt(M_ARENA_MAX, n)`); False where the C
    library is not glibc. Process-wide, so only the serving entry points ask for it (the
    `malloc_arenas` setting). Each request thread otherwise gets an arena of its own (up to 8 per
    core), and freed memory scattered over them stays with the process: 16 concurrent 64-photo
    classify calls left a server 174-199 MB over idle 10 s later, with 2 arenas back under idle."""
    import ctypes

    if n < 1:
        raise ValueError(f"malloc arenas {n} must be >= 1")
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, n))


class HeapTrimmer:
    """One background thread that, every `every_s`, gives the C heap's free pages back to the system
    (`trim`, default glibc's `malloc_trim(0)`) when the gate ran a model since the last look and is
    idle now: memory returns after a burst, and nothing is done on an idle or a busy server. A
    no-op where there is no `trim`. `close()` stops it."""

    def __init__(self, gate: EmbedGate, every_s: float = 2.0, trim: Callable[[], object] | None = None) -> None:
        if every_s <= 0:
            raise ValueError(f"heap trim interval {every_s} s must be > 0")
        self.gate, self.every_s = gate, every_s
        self._trim = trim if trim is not None else _malloc_trim()
        self._stop = threading.Event()
        self._seen = gate.runs
        self.trims = 0
        self._thread: threading.Thread | None = None
        if self._trim is not None:
            self._thread = threading.Thread(target=self._loop, name="fewshot-heap-trim", daemon=True)
            self._thread.start()

    def check(self) -> bool:
        """Trim now if the gate ran since the last check and is idle; returns whether it trimmed."""
        runs = self.gate.runs
        if self._trim is None or runs == self._seen or not self.gate.idle:
            return False
        self._seen = runs
        self._trim()
        self.trims += 1
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.check()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


@dataclass
class _Request:
    """Several embed calls as one request (`one_request`): whether its first chunk was queued, and when."""

    since: float | None = None


_request: ContextVar[_Request | None] = ContextVar("fewshot_embed_request", default=None)


@contextmanager
def one_request() -> Iterator[None]:
    """Several embed calls as one request: only the first chunk of the first call is a first chunk
    (admission, priority); the rest queue as later chunks, behind other requests' first chunks.
    Used by occlusion (1 + cells^2 images embedded in several calls)."""
    token = _request.set(_Request())
    try:
        yield
    finally:
        _request.reset(token)


class GatedEmbedder:
    """`inner` (the bundle's embedder) through `gate`, at most `chunk` images per model run; an ONNX
    Runtime embedder runs with arena shrinkage."""

    def __init__(self, inner: Embedder, gate: EmbedGate, chunk: int = DEFAULT_CHUNK) -> None:
        if chunk < 1:
            raise ValueError(f"embedding chunk {chunk} must be >= 1 image")
        self.inner, self.gate, self.chunk = inner, gate, min(chunk, gate.max_batch)
        self.embedding_dim = inner.embedding_dim
        self._session: Any = getattr(inner, "session", None)
        self._run_options: Any = None
        if self._session is not None and getattr(inner, "pre", None) is not None:
            import onnxruntime as ort

            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def _embed(self, part: np.ndarray) -> np.ndarray:
        if self._run_options is None:
            return self.inner.embed(part)
        inner: Any = self.inner
        check_batch(part, inner.channels, inner.size)
        (out,) = self._session.run([ONNX_OUTPUT], {ONNX_INPUT: model_input(part, inner.pre)}, self._run_options)
        return np.asarray(out, dtype=np.float32)

    def embed(self, images_u8: np.ndarray) -> np.ndarray:
        """(N, C, H, W) uint8 -> (N, D) float32, through the gate `chunk` images at a time."""
        if len(images_u8) == 0:
            return self.inner.embed(images_u8)
        request = _request.get() or _Request()
        parts = []
        for i in range(0, len(images_u8), self.chunk):
            first = request.since is None
            if first:
                request.since = time.monotonic()
            parts.append(self.gate.embed(self, self._embed, images_u8[i:i + self.chunk], first=first,
                                         since=request.since))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
