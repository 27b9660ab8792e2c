"""Cost bounds of the routes that multiply work (issue 16, finding 7), checked before the work starts:

* `ImageBudget`: occlusion embeds 1 + cells^2 images per request (197 at 14 cells, about 2 s of CPU
  on the photos model from a 1 KB upload); each workspace may embed at most `per_minute` such
  images (a token bucket refilled continuously), beyond that 429 + Retry-After. Its images also go
  through the embedding queue as one request (`fewshot.service.embedding.one_request`): after its
  first chunk they queue behind other requests' first chunks, so it cannot starve them.
* `OneAtATime`: insight and export compute at most one result at a time for the whole service
  (8 concurrent insight calls after a change each computed the same result: +715 MB); a caller
  that cannot start within `wait_s` gets 503 busy + Retry-After, and a caller that waited finds the
  result the one before it cached.
* `ExportCache`: export built a 12.5 MB zip (ONNX compose, serialisation) on every call; it is
  cached per workspace, keyed on what it is made of (the workspace's version, its settings, the
  model), at most `max_entries` zips, built one at a time.
* `Refitter`: a logistic head is refitted on the stored examples after every change (6-8 s for a
  large workspace), lazily by the first request that needs it; after a registration the service
  refits in one background thread instead (one workspace at a time, a workspace queued once), so
  the next classify usually finds the head fitted.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from math import ceil

from fewshot.errors import FewshotError
from fewshot.service.embedding import ServiceBusy

OCCLUSION_IMAGES_PER_MINUTE = 600  # per workspace: three 14-cell maps, or twelve 7-cell maps, a minute


class OverBudget(FewshotError):
    """A workspace spent its budget of some work: 429 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ImageBudget:
    """At most `per_minute` images per key (a workspace), as a token bucket of that size refilled
    continuously; `spend` refuses (OverBudget) a request that does not fit, naming when it will."""

    def __init__(self, per_minute: int = OCCLUSION_IMAGES_PER_MINUTE, what: str = "occlusion",
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000) -> None:
        if per_minute < 1:
            raise ValueError(f"image budget {per_minute} must be >= 1 image per minute")
        self.per_minute, self.what, self.clock, self.max_keys = per_minute, what, clock, max_keys
        self._left: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()

    def spend(self, key: Hashable, images: int) -> None:
        if images > self.per_minute:
            raise OverBudget(f"{self.what} of {images} images exceeds the budget of {self.per_minute} images per "
                             "minute per workspace; use fewer cells", 60)
        rate = self.per_minute / 60.0  # images per second
        with self._lock:
            now = self.clock()
            tokens, at = self._left.pop(key, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - at) * rate)
            if tokens < images:
                self._left[key] = (tokens, now)
                wait = max(1, ceil((images - tokens) / rate))
                raise OverBudget(f"this workspace used its {self.what} budget ({self.per_minute} images embedded per "
                                 f"minute); retry in {wait} s or use fewer cells", wait)
            self._left[key] = (tokens - images, now)
            while len(self._left) > self.max_keys:
                self._left.popitem(last=False)


class OneAtATime:
    """At most one holder at a time; a caller that cannot start within `wait_s` is refused (ServiceBusy)."""

    def __init__(self, what: str, wait_s: float = 10.0) -> None:
        self.what, self.wait_s = what, wait_s
        self._lock = threading.Lock()

    @contextmanager
    def turn(self) -> Iterator[None]:
        if not self._lock.acquire(timeout=self.wait_s):
            raise ServiceBusy(f"the server is busy ({self.what} of another workspace is being computed); retry in a second")
        try:
            yield
        finally:
            self._lock.release()


class ExportCache:
    """The last `max_entries` exported zips, by workspace, valid while their key holds. One build at
    a time: a caller waits for the build going on (then finds it cached if it was the same), or is
    refused (ServiceBusy) when it cannot start within `wait_s`."""

    def __init__(self, max_entries: int = 4, wait_s: float = 10.0) -> None:
        self.max_entries, self.wait_s = max_entries, wait_s
        self._entries: OrderedDict[str, tuple[Hashable, bytes]] = OrderedDict()
        self._turn = OneAtATime("an export", wait_s)
        self.builds = 0

    def get(self, workspace_id: str, key: Hashable, build: Callable[[], bytes]) -> bytes:
        with self._turn.turn():
            entry = self._entries.pop(workspace_id, None)
            if entry is None or entry[0] != key:
                entry = (key, build())
                self.builds += 1
            self._entries[workspace_id] = entry  # the most recently used last
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return entry[1]


class Refitter:
    """One background thread that runs `refit()` jobs, one workspace at a time, each queued once."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fewshot-refit")
        self._queued: set[Hashable] = set()
        self._lock = threading.Lock()

    def schedule(self, key: Hashable, refit: Callable[[], object]) -> None:
        with self._lock:
            if key in self._queued:
                return
            self._queued.add(key)

        def run() -> None:
            with self._lock:
                self._queued.discard(key)
            with suppress(Exception):  # the request that needs the head refits and reports the error
                refit()

        self._pool.submit(run)

    def idle(self, timeout_s: float = 30.0) -> bool:
        """Wait until every scheduled refit ran (tests)."""
        done = threading.Event()
        self._pool.submit(done.set)
        return done.wait(timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
