"""The embedding queue batches across concurrent requests (issue 16): each request gets exactly the
rows of its own images, in order, whatever it was batched with; a full queue is a 503 with
Retry-After; a failing run fails only the requests whose images fail. Tiny models made here."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from service_helpers import ToyEmbedder, class_images

from fewshot.errors import ConfigError
from fewshot.service.embedding import (
    EmbedGate,
    GatedEmbedder,
    HeapTrimmer,
    ServiceBusy,
    _malloc_trim,
    limit_malloc_arenas,
    one_request,
)


class Recording:
    """A toy model (fixed random projection) that records the size of every run and can be told
    to fail on images whose first pixel is 255."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.inner = ToyEmbedder()
        self.embedding_dim = self.inner.embedding_dim
        self.sizes: list[int] = []
        self.pixels: list[list[int]] = []  # each run's first pixel of each image
        self.hold = hold  # the first run waits for it

    def embed(self, images: np.ndarray) -> np.ndarray:
        if self.hold is not None and not self.sizes:
            self.hold.wait(10)
        self.sizes.append(len(images))
        self.pixels.append([int(v) for v in images[:, 0, 0, 0]])
        if (images[:, 0, 0, 0] == 255).any():
            raise RuntimeError("poisoned image")
        return self.inner.embed(images)


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def start(gate: EmbedGate, calls: list[Callable[[], Any]]) -> tuple[list[threading.Thread], list[Any]]:
    """Start the calls one at a time, each queued before the next starts (a known queue order)."""
    threads, out = [], [None] * len(calls)
    for i, fn in enumerate(calls):
        def one(i: int = i, fn: Callable[[], Any] = fn) -> None:
            try:
                out[i] = fn()
            except Exception as exc:  # noqa: BLE001 - handed back to the test
                out[i] = exc
        before = gate.queued
        threads.append(threading.Thread(target=one))
        threads[-1].start()
        wait_for(lambda before=before: gate.queued > before, f"call {i} to queue")
    return threads, out


def join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(10)
        assert not t.is_alive()


def test_concurrent_requests_share_one_run_and_each_gets_its_own_rows(tiny_bundle: Path) -> None:
    from fewshot.artifacts.bundle import load_bundle

    inner = load_bundle(tiny_bundle, verify_parity=False).onnx_embedder
    gate = EmbedGate(slots=1, max_batch=8)
    gated = GatedEmbedder(inner, gate, chunk=8)
    requests = [class_images(seed, n) for seed, n in ((1, 1), (2, 3), (3, 1), (4, 2))]  # 7 images in all
    with gate.slot():  # the model is busy: the four requests queue up
        threads, out = start(gate, [lambda x=x: gated.embed(x) for x in requests])
    join(threads)
    assert gate.runs == 1 and gate.chunks == 4  # one run of 7 images for four requests
    for x, got in zip(requests, out, strict=True):
        assert isinstance(got, np.ndarray) and got.shape == (len(x), inner.embedding_dim)
        assert np.allclose(got, inner.embed(x), atol=1e-5)  # as if embedded alone, rows in order


def test_a_run_never_holds_more_than_max_batch_images() -> None:
    model = Recording()
    gate = EmbedGate(slots=1, max_batch=4)
    gated = GatedEmbedder(model, gate, chunk=8)  # a chunk is never larger than the gate's batch
    requests = [class_images(seed, n) for seed, n in ((1, 3), (2, 2), (3, 1), (4, 6))]
    with gate.slot():
        threads, out = start(gate, [lambda x=x: gated.embed(x) for x in requests])
    join(threads)
    assert max(model.sizes) <= 4 and sum(model.sizes) == 12
    for x, got in zip(requests, out, strict=True):
        assert np.allclose(got, model.inner.embed(x), atol=1e-6)


def test_models_are_never_batched_together() -> None:
    a, b = Recording(), Recording()
    gate = EmbedGate(slots=1, max_batch=8)
    ga, gb = GatedEmbedder(a, gate), GatedEmbedder(b, gate)
    xs = [class_images(s, 1) for s in range(4)]
    with gate.slot():
        threads, out = start(gate, [lambda: ga.embed(xs[0]), lambda: gb.embed(xs[1]), lambda: ga.embed(xs[2]),
                                    lambda: gb.embed(xs[3])])
    join(threads)
    assert a.sizes == [2] and b.sizes == [2]
    for x, got in zip(xs, out, strict=True):
        assert np.allclose(got, a.inner.embed(x), atol=1e-6)


def test_a_failing_run_fails_only_the_requests_whose_images_fail() -> None:
    model = Recording()
    gate = EmbedGate(slots=1, max_batch=8)
    gated = GatedEmbedder(model, gate)
    good1, good2 = class_images(1, 2), class_images(2, 1)
    bad = class_images(3, 2)
    bad[1, 0, 0, 0] = 255
    with gate.slot():
        threads, out = start(gate, [lambda: gated.embed(good1), lambda: gated.embed(bad), lambda: gated.embed(good2)])
    join(threads)
    assert isinstance(out[1], RuntimeError) and "poisoned" in str(out[1])
    assert np.allclose(out[0], model.inner.embed(good1), atol=1e-6)
    assert np.allclose(out[2], model.inner.embed(good2), atol=1e-6)
    assert model.sizes[0] == 5  # the batched run failed, then each chunk was run alone
    assert np.allclose(gated.embed(good2), model.inner.embed(good2), atol=1e-6)  # the slot was given back


def test_a_full_queue_refuses_newcomers_but_finishes_admitted_requests() -> None:
    model = Recording()
    gate = EmbedGate(slots=1, max_waiting=2, max_batch=4)
    gated = GatedEmbedder(model, gate, chunk=4)
    big, small = class_images(1, 12), class_images(2, 1)
    with gate.slot():
        threads, out = start(gate, [lambda: gated.embed(big), lambda: gated.embed(small)])
        with pytest.raises(ServiceBusy, match="2 batches of images already wait"):
            gated.embed(small)
        assert gate.refused == 1
    join(threads)
    assert np.allclose(out[0], model.inner.embed(big), atol=1e-6)  # all 3 chunks, though the queue was full
    assert np.allclose(out[1], model.inner.embed(small), atol=1e-6)


def test_a_request_not_taken_within_wait_s_is_busy() -> None:
    gate = EmbedGate(slots=1, max_waiting=4, wait_s=0.05)
    gated = GatedEmbedder(Recording(), gate)
    with gate.slot(), pytest.raises(ServiceBusy, match="within 0.05 s"):
        gated.embed(class_images(1, 1))
    assert gate.waiting == 0
    gated.embed(class_images(1, 1))  # the slot and the queue were given back


def test_first_chunks_go_before_later_chunks_first_come_first_served() -> None:
    hold = threading.Event()
    model = Recording(hold)
    gate = EmbedGate(slots=1, max_batch=2, wait_s=30)
    gated = GatedEmbedder(model, gate, chunk=2)

    def request(value: int, n: int) -> np.ndarray:
        return np.full((n, 1, 28, 28), value, np.uint8)

    threads, _ = start(gate, [lambda: gated.embed(request(10, 6))])  # three chunks; its first run is held
    wait_for(lambda: gate._free == 0, "the long request's first run")
    more, _ = start(gate, [lambda: gated.embed(request(20, 2)), lambda: gated.embed(request(30, 2))])
    hold.set()
    join(threads + more)
    # newcomers' first chunks went ahead of the long request's later ones, in the order they came
    assert model.pixels == [[10, 10], [20, 20], [30, 30], [10, 10], [10, 10]]


def test_a_request_that_waited_wait_s_gets_its_later_chunks_run_first() -> None:
    """Promotion counts from the request's admission, not from each chunk's own queueing: a request
    of many chunks must not wait wait_s per chunk behind a stream of newcomers (a 50-image occlusion
    map under 32 clients went unanswered for 30 s)."""
    model = Recording()
    gate = EmbedGate(slots=1, max_batch=2, wait_s=30)
    gated = GatedEmbedder(model, gate, chunk=2)
    admitted_long_ago = time.monotonic() - 60
    with gate.slot():  # the model is busy; a newcomer's first chunk queues, then an old request's later chunk
        threads, out = start(gate, [
            lambda: gated.embed(np.full((2, 1, 28, 28), 20, np.uint8)),
            lambda: gate.embed(gated, gated._embed, np.full((2, 1, 28, 28), 10, np.uint8), first=False,
                               since=admitted_long_ago),
            lambda: gate.embed(gated, gated._embed, np.full((2, 1, 28, 28), 30, np.uint8), first=False,
                               since=time.monotonic())])
    join(threads)
    # the old request's chunk went ahead of the newcomer; the fresh request's later chunk behind it
    assert model.pixels == [[10, 10], [20, 20], [30, 30]]


def test_occlusion_embeds_as_one_request() -> None:
    gate = EmbedGate(slots=1, max_batch=8)
    gated = GatedEmbedder(Recording(), gate)
    firsts: list[bool] = []
    sinces: list[float | None] = []
    original = gate.embed

    def spy(model: object, run: Any, images: np.ndarray, *, first: bool = True, since: float | None = None
            ) -> np.ndarray:
        firsts.append(first)
        sinces.append(since)
        return original(model, run, images, first=first, since=since)

    gate.embed = spy  # type: ignore[method-assign]
    gated.embed(class_images(1, 1))
    gated.embed(class_images(1, 9))
    assert firsts == [True, True, False]  # every call is a request of its own
    assert sinces[0] is not None and sinces[0] < sinces[1] == sinces[2]  # admitted at its first chunk
    firsts.clear()
    sinces.clear()
    with one_request():  # occlusion: many calls, one request, admitted once
        for _ in range(3):
            time.sleep(0.01)
            gated.embed(class_images(1, 9))
    assert firsts == [True] + [False] * 5
    assert sinces[0] is not None and sinces == [sinces[0]] * 6


def test_a_run_waits_for_more_work_only_while_another_run_is_going() -> None:
    model = Recording()
    gate = EmbedGate(slots=2, max_batch=8, max_delay_s=30.0)
    gated = GatedEmbedder(model, gate)
    t0 = time.monotonic()
    gated.embed(class_images(1, 1))  # an idle server runs at once (no 30 s wait)
    assert time.monotonic() - t0 < 15 and model.sizes == [1]
    with gate.slot():  # another run is going: the next run waits for more work to join
        threads, out = start(gate, [lambda: gated.embed(class_images(2, 3))])
        wait_for(lambda: gate.waiting == 1 and gate._free == 0, "the run to wait for more work")
        more, out2 = start(gate, [lambda: gated.embed(class_images(3, 5))])  # 3 + 5: the batch is full
        join(threads + more)
    assert model.sizes == [1, 8]
    assert np.allclose(out[0], model.inner.embed(class_images(2, 3)), atol=1e-6)
    assert np.allclose(out2[0], model.inner.embed(class_images(3, 5)), atol=1e-6)


def test_heap_trimmer_trims_once_after_work_and_only_when_idle() -> None:
    gate = EmbedGate(slots=1, max_batch=8)
    gated = GatedEmbedder(Recording(), gate)
    trims: list[int] = []
    trimmer = HeapTrimmer(gate, every_s=3600, trim=lambda: trims.append(gate.runs))  # checked by hand here
    try:
        assert not trimmer.check() and trims == []  # nothing ran yet
        gated.embed(class_images(1, 3))
        with gate.slot():
            assert not trimmer.check()  # a run is going: not now
        assert trimmer.check() and trims == [1]  # idle after work
        assert not trimmer.check() and trims == [1]  # no work since
        gated.embed(class_images(1, 3))
        assert trimmer.check() and trims == [1, 2]
    finally:
        trimmer.close()


def test_heap_trimmer_thread_gives_memory_back_after_a_burst_and_stops() -> None:
    gate = EmbedGate(slots=1, max_batch=8)
    gated = GatedEmbedder(Recording(), gate)
    done = threading.Event()
    trimmer = HeapTrimmer(gate, every_s=0.01, trim=done.set)
    gated.embed(class_images(1, 2))
    assert done.wait(10)
    trimmer.close()
    assert trimmer.trims == 1 and not trimmer._thread.is_alive()  # type: ignore[union-attr]


def test_the_c_library_trim_is_found_on_glibc() -> None:
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    trim = _malloc_trim()
    assert trim is not None and trim() in (0, 1)


def test_malloc_arenas_are_limited_where_the_serving_entry_point_asks(tiny_bundle: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Process-wide, so only when the settings say so; `serve` says 2 (16 concurrent 64-photo
    requests then leave the server under its idle level instead of 174-199 MB over)."""
    import platform

    import uvicorn

    import fewshot.service.http.app as app_module
    from fewshot.service.app import open_state, serve
    from fewshot.service.settings import ServiceSettings

    asked: list[int] = []
    monkeypatch.setattr(app_module, "limit_malloc_arenas", lambda n: asked.append(n) or True)
    for arenas in (0, 3):
        state = open_state(ServiceSettings(bundle_path=str(tiny_bundle), db_url=str(tmp_path / f"{arenas}.db"),
                                           malloc_arenas=arenas))
        state.store.close()
    assert asked == [3]
    served: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **k: served.append(app))
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    monkeypatch.delenv("FEWSHOT_MALLOC_ARENAS", raising=False)
    serve(str(tiny_bundle), str(tmp_path / "s.db"))
    assert served[0].state.settings.malloc_arenas == 2
    with pytest.raises(ConfigError, match="malloc_arenas=-1"):
        ServiceSettings(bundle_path=str(tiny_bundle), malloc_arenas=-1)
    with pytest.raises(ValueError, match="malloc arenas 0"):
        limit_malloc_arenas(0)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        import os

        # glibc's own default bound on 64-bit (8 per core): accepted, and this test process unchanged
        assert limit_malloc_arenas(8 * (os.cpu_count() or 1))
