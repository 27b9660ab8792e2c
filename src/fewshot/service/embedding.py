"""Embedding as a bounded resource: small chunks, a fixed number of them at once, memory given back.

A request's images used to go through one ONNX Runtime run (64 photos at 224x224, occlusion in 32s),
with nothing bounding how many ran at once and ORT's CPU arena keeping its high-water mark forever:
8 concurrent 64-image classify calls left a server at 4.45 GB. `GatedEmbedder` wraps the served
embedder:

* images go through the model `chunk` at a time (8), so one run's activations are small;
* each chunk holds one of the `EmbedGate`'s slots (default: one per core; ORT runs one thread per
  call), so concurrent requests interleave chunk by chunk and a bystander's one-image request waits
  for at most a few chunks, not for whole 64-image requests;
* a request is admitted at its first chunk: when `max_waiting` chunks already wait, or a slot does
  not free within `wait_s`, it is refused with `ServiceBusy` (503 + Retry-After) instead of queueing
  without bound; an admitted request is finished, its later chunks queued behind newcomers' first
  chunks (a one-image request waits for the chunks running now, not for whole 64-image requests);
* ONNX Runtime runs with arena shrinkage (`memory.enable_memory_arena_shrinkage`), so the arena
  returns what a run used to the system after the run.

Measured (/tmp-built 224x224 RGB Conv-4, 4 threads x 64 images; see the commit): one run of 64 per
call peaked at 4.5 GB and stayed at 4.4 GB; chunks of 8 peaked at 1.0 GB and stayed there; chunks
of 8 with shrinkage peaked at 1.0 GB and went back to 0.48 GB (0.33 GB before).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from fewshot.artifacts.embedders import ONNX_INPUT, ONNX_OUTPUT, Embedder, check_batch
from fewshot.data.imageio import model_input
from fewshot.errors import FewshotError

DEFAULT_CHUNK = 8


class ServiceBusy(FewshotError):
    """Too much embedding work is already running or waiting: 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EmbedGate:
    """At most `slots` chunks embedded at once. A request is admitted at its first chunk: refused
    (`ServiceBusy`) when `max_waiting` chunks already wait or no slot frees within `wait_s`; its
    later chunks then wait as long as it takes.
    Waiting chunks are served first come first served (a thread that just released a slot cannot
    take it again ahead of those waiting), a request's first chunk ahead of the later chunks of
    requests already running: a one-image request waits for the chunks running now, not for every
    chunk of the 64-image requests before it."""

    def __init__(self, slots: int = 0, max_waiting: int = 32, wait_s: float = 5.0) -> None:
        self.slots = slots or max(1, os.cpu_count() or 1)
        if self.slots < 1 or max_waiting < 0 or wait_s < 0:
            raise ValueError(f"embed gate: slots {slots}, max_waiting {max_waiting}, wait_s {wait_s} must be >= 0")
        self.max_waiting, self.wait_s = max_waiting, wait_s
        self._cond = threading.Condition()
        self._free = self.slots
        self._queues: tuple[deque[object], deque[object]] = (deque(), deque())  # first chunks, later chunks
        self.refused = 0

    @property
    def waiting(self) -> int:
        return len(self._queues[0]) + len(self._queues[1])

    def _head(self) -> object:
        return self._queues[0][0] if self._queues[0] else self._queues[1][0]

    def _busy(self, why: str) -> ServiceBusy:
        self.refused += 1
        return ServiceBusy(f"the server is busy ({why}); retry in a second")

    def _acquire(self, first: bool = True) -> None:
        with self._cond:
            if self._free > 0 and not self.waiting:
                self._free -= 1
                return
            if first and self.waiting >= self.max_waiting:
                raise self._busy(f"{self.max_waiting} batches of images already wait for the model")
            me, queue = object(), self._queues[0 if first else 1]
            queue.append(me)
            # admission is decided at a request's first chunk; an admitted request is finished: its later
            # chunks never time out, and one that waited wait_s goes to the front (no starvation)
            deadline = time.monotonic() + self.wait_s
            while not (self._head() is me and self._free > 0):
                remaining = deadline - time.monotonic()
                if remaining <= 0 and first:
                    queue.remove(me)
                    self._cond.notify_all()
                    raise self._busy(f"no model slot freed within {self.wait_s:g} s")
                if remaining <= 0 and queue is self._queues[1]:
                    queue.remove(me)
                    queue = self._queues[0]
                    queue.appendleft(me)
                    continue
                self._cond.wait(remaining if remaining > 0 else None)
            queue.remove(me)
            self._free -= 1
            self._cond.notify_all()  # the next in line, if a slot is still free

    def _release(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify_all()

    @contextmanager
    def slot(self, first: bool = True) -> Iterator[None]:
        """One chunk's slot; `first`: the request's first chunk (served before later chunks)."""
        self._acquire(first)
        try:
            yield
        finally:
            self._release()


class GatedEmbedder:
    """`inner` (the bundle's embedder), `chunk` images at a time through `gate`; an ONNX Runtime
    embedder runs with arena shrinkage."""

    def __init__(self, inner: Embedder, gate: EmbedGate, chunk: int = DEFAULT_CHUNK) -> None:
        if chunk < 1:
            raise ValueError(f"embedding chunk {chunk} must be >= 1 image")
        self.inner, self.gate, self.chunk = inner, gate, chunk
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
        """(N, C, H, W) uint8 -> (N, D) float32, `chunk` images per model run."""
        if len(images_u8) == 0:
            return self.inner.embed(images_u8)
        parts = []
        for i in range(0, len(images_u8), self.chunk):
            with self.gate.slot(first=i == 0):
                parts.append(self._embed(images_u8[i:i + self.chunk]))
        return np.concatenate(parts)
