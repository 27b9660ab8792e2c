"""Regression tests for the recogniser under attack: concurrent writers, labels, thresholds."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from service_helpers import ToyEmbedder, class_images

from fewshot.service.errors import RequestError
from fewshot.service.recogniser import Recogniser, check_label
from fewshot.service.store import InvalidInput, Store, open_store


def _memory_view(r: Recogniser, ws: str) -> dict[str, tuple[int, np.ndarray]]:
    p = r._memory(ws).protos
    return {c: (int(p.counts[i]), p.means[i]) for i, c in enumerate(p.class_ids)}


@pytest.mark.parametrize("target", ["one class", "several classes"])
def test_concurrent_writers_leave_the_running_process_equal_to_a_fresh_one(store_url: str, target: str) -> None:
    """16 threads add images to one class (or spread over classes) at once; the running
    recogniser's memory must equal a fresh recogniser's read of the same store."""
    store = open_store(store_url)
    r = Recogniser(ToyEmbedder(), store)
    ws, _ = r.create_workspace("race")
    ids = [r.add_class(ws.id, f"c{i}", class_images(i, 2)).id for i in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def writer(t: int) -> None:
        try:
            start.wait()
            for j in range(24):
                cid = ids[0] if target == "one class" else ids[(t + j) % 4]
                r.add_images(ws.id, cid, class_images(100 + 16 * t + j, 1))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    running = _memory_view(r, ws.id)
    fresh_store = open_store(store_url)
    fresh = _memory_view(Recogniser(ToyEmbedder(), fresh_store), ws.id)
    assert running.keys() == fresh.keys()
    for c in fresh:
        assert running[c][0] == fresh[c][0], f"class {c}: {running[c][0]} examples in memory, {fresh[c][0]} stored"
        np.testing.assert_allclose(running[c][1], fresh[c][1], rtol=1e-5, atol=1e-5)
    assert sum(n for n, _ in fresh.values()) == 4 * 2 + 16 * 24
    fresh_store.close()
    store.close()


def test_labels_are_normalised_and_the_reserved_word_is_caseless(sqlite_store: Store) -> None:
    r = Recogniser(ToyEmbedder(), sqlite_store)
    ws, _ = r.create_workspace("labels")
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    rec = r.add_class(ws.id, f"  {nfd} ", class_images(0, 2))
    assert rec.label == nfc  # stored as NFC, trimmed
    with pytest.raises(Exception, match="already exists"):
        r.add_class(ws.id, nfc, class_images(1, 2))
    for reserved in ("unknown", "Unknown", "UNKNOWN", " unKnown "):
        with pytest.raises(RequestError, match="reserved"):
            r.add_class(ws.id, reserved, class_images(2, 2))
    for bad, why in (("", "empty"), ("   ", "empty"), ("a\x00b", "control"), ("tab\there", "control"),
                     ("x" * 201, "at most 200")):
        with pytest.raises(RequestError, match=why):
            check_label(bad)
    with pytest.raises(RequestError, match="control"):
        r.rename_class(ws.id, rec.id, "nul\x00")
    with pytest.raises(RequestError, match="control"):
        r.create_workspace("ws\x00name")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_thresholds_are_refused_on_classify(sqlite_store: Store, bad: float) -> None:
    r = Recogniser(ToyEmbedder(), sqlite_store)
    ws, _ = r.create_workspace("t")
    r.add_class(ws.id, "a", class_images(0, 3))
    with pytest.raises(RequestError, match="finite"):
        r.classify(ws.id, class_images(0, 1), threshold=bad)
    with pytest.raises(RequestError, match="finite"):
        r.explain(ws.id, class_images(0, 1)[0], threshold=bad)


def test_nul_in_any_text_is_refused_by_both_backends(store: Store) -> None:
    """PostgreSQL cannot store NUL (it raised and gave a 500); SQLite could: both now refuse it."""
    with pytest.raises(InvalidInput, match="NUL"):
        store.get_workspace("ws\x00x")
    with pytest.raises(InvalidInput, match="NUL"):
        store.create_workspace("a\x00b", "h" * 64, {}, "aaaa")
    assert store.list_workspaces() == []


def test_spoofed_and_invisible_labels_are_refused() -> None:
    for bad in ("unknown\u200b", "\uff55\uff4e\uff4b\uff4e\uff4f\uff57\uff4e", "\u200b", "\u202enwonknu", "a\u2066b"):
        with pytest.raises(RequestError, match="reserved|invisible"):
            check_label(bad)


@pytest.mark.parametrize("value", [10 ** 400, -(10 ** 400), True])
def test_overflowing_and_boolean_thresholds_are_refused(value: object) -> None:
    from fewshot.service.recogniser import check_threshold

    with pytest.raises(RequestError, match="finite"):
        check_threshold(value)


def test_images_per_class_limit_holds_across_calls(sqlite_store: Store) -> None:
    from fewshot.service.recogniser import RecogniserConfig
    from fewshot.service.store import ConflictError

    r = Recogniser(ToyEmbedder(), sqlite_store, config=RecogniserConfig(max_images_per_class=5))
    ws, _ = r.create_workspace("cap")
    cid = r.add_class(ws.id, "a", class_images(0, 3)).id
    r.add_images(ws.id, cid, class_images(1, 2))
    with pytest.raises(ConflictError, match="limit of 5"):
        r.add_images(ws.id, cid, class_images(2, 1))
    assert r.store.get_class(ws.id, cid).n_examples == 5


def test_concurrent_partial_setting_updates_never_overwrite_each_other(store: Store) -> None:
    r = Recogniser(ToyEmbedder(), store)
    for round_ in range(10):
        ws, _ = r.create_workspace(f"patch{round_}")
        start = threading.Barrier(2)

        def patch(given: dict, ws_id: str, start: threading.Barrier) -> None:  # type: ignore[type-arg]
            start.wait()
            r.patch_settings(ws_id, given)

        threads = [threading.Thread(target=patch, args=(g, ws.id, start))
                   for g in ({"head": "logistic"}, {"threshold": 1.5})]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert r.settings(ws.id).head == "logistic" and r.settings(ws.id).threshold == 1.5


def test_changing_the_metric_clears_a_threshold_of_the_old_scale(sqlite_store: Store) -> None:
    r = Recogniser(ToyEmbedder(), sqlite_store)
    ws, _ = r.create_workspace("m")
    r.patch_settings(ws.id, {"threshold": 2.5})
    assert r.patch_settings(ws.id, {"metric": "cosine"}).settings["threshold"] is None
    assert r.patch_settings(ws.id, {"metric": "euclidean", "threshold": 3.0}).settings["threshold"] == 3.0
