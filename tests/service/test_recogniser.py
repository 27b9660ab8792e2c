"""Recogniser core: teach, classify, reject unknowns, explain, sync across instances (no HTTP)."""

from __future__ import annotations

import numpy as np
import pytest
from service_helpers import ToyEmbedder, class_images

from fewshot.decision import BundleDecision, OpenSetRule
from fewshot.service.errors import RequestError
from fewshot.service.recogniser import Recogniser, RecogniserConfig, WorkspaceSettings
from fewshot.service.store import ConflictError, NotFoundError, Store, open_store


def calibrated(euclidean: float) -> BundleDecision:
    """A bundle's decision whose Euclidean open-set rule accepts d^2 <= `euclidean`."""
    return BundleDecision(open_set={"euclidean": OpenSetRule("global", "euclidean", euclidean)})


def taught(store: Store, n_classes: int = 3, settings: WorkspaceSettings | None = None) -> tuple[Recogniser, str, list[str]]:
    r = Recogniser(ToyEmbedder(), store)
    ws, _ = r.create_workspace("demo", settings)
    ids = [r.add_class(ws.id, f"class{c}", class_images(c, 5)).id for c in range(n_classes)]
    return r, ws.id, ids


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("head", ["prototype", "logistic"])
def test_classifies_held_out_images_of_taught_classes(sqlite_store: Store, metric: str, head: str) -> None:
    r, ws, ids = taught(sqlite_store, 4, WorkspaceSettings(metric=metric, head=head))  # type: ignore[arg-type]
    queries = np.concatenate([class_images(c, 8)[5:] for c in range(4)])  # unseen noise draws
    preds = r.classify(ws, queries, top_k=3)
    assert [p.class_id for p in preds] == [ids[c] for c in range(4) for _ in range(3)]
    for p in preds:
        assert p.known and len(p.top_k) == 3 and p.label == p.top_k[0].label
        probs = [c.probability for c in p.top_k]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_probabilities_are_protonet_softmax(sqlite_store: Store) -> None:
    r, ws, _ = taught(sqlite_store, 3)
    emb = ToyEmbedder()
    protos = np.stack([emb.embed(class_images(c, 5)).mean(0) for c in range(3)])
    q = class_images(1, 6)[5:]
    d2 = ((emb.embed(q)[:, None, :] - protos[None]) ** 2).sum(-1)[0]
    expect = np.exp(-(d2 - d2.min())) / np.exp(-(d2 - d2.min())).sum()
    p = r.classify(ws, q, top_k=3)[0]
    got = {c.label: c.probability for c in p.top_k}
    np.testing.assert_allclose([got[f"class{i}"] for i in range(3)], expect, rtol=1e-4, atol=1e-6)
    assert p.score == pytest.approx(d2.min(), rel=1e-4)


def test_unknown_rejection_and_overrides(sqlite_store: Store) -> None:
    r, ws, _ = taught(sqlite_store, 2)
    r.decision = calibrated(euclidean=1e-9)  # nothing is that close: everything is unknown
    p = r.classify(ws, class_images(0, 6)[5:])[0]
    assert not p.known and p.label == "unknown" and p.class_id is None and p.top_k  # candidates still shown
    p = r.classify(ws, class_images(0, 6)[5:], threshold=1e9)[0]  # per-call override
    assert p.known and p.label == "class0"
    r.update_settings(ws, WorkspaceSettings(threshold=1e9))  # per-workspace override
    assert r.classify(ws, class_images(0, 6)[5:])[0].known
    far = np.full((1, 1, 28, 28), 255, np.uint8)
    t = float(r.classify(ws, class_images(0, 6)[5:])[0].score) * 2
    assert not r.classify(ws, far, threshold=t)[0].known


def test_incremental_add_images_updates_only_that_prototype(sqlite_store: Store) -> None:
    r, ws, ids = taught(sqlite_store, 3)
    before = r._memory(ws).protos
    more = class_images(1, 9)[5:]
    rec = r.add_images(ws, ids[1], more)
    after = r._memory(ws).protos
    assert rec.n_examples == 9
    i = after.index[ids[1]]
    for j in range(3):
        if j != i:
            np.testing.assert_array_equal(after.means[j], before.means[j])
    expect = ToyEmbedder().embed(np.concatenate([class_images(1, 5), more])).mean(0)
    np.testing.assert_allclose(after.means[i], expect, rtol=1e-5, atol=1e-5)
    # a fresh recogniser rebuilding from the store gets the same prototypes
    fresh = Recogniser(ToyEmbedder(), sqlite_store)._memory(ws).protos
    np.testing.assert_allclose(fresh.means[fresh.index[ids[1]]], after.means[i], rtol=1e-6)


def test_rename_delete_and_errors(sqlite_store: Store) -> None:
    r, ws, ids = taught(sqlite_store, 3)
    r.rename_class(ws, ids[0], "renamed")
    assert r.classify(ws, class_images(0, 6)[5:])[0].label == "renamed"
    r.delete_class(ws, ids[0])
    assert all(p.class_id != ids[0] for p in r.classify(ws, class_images(0, 6)[5:], top_k=5)[0].top_k)
    assert r.class_count(ws) == 2
    with pytest.raises(NotFoundError):
        r.add_images(ws, ids[0], class_images(0, 1))
    with pytest.raises(RequestError, match="reserved"):
        r.add_class(ws, "unknown", class_images(9, 1))
    with pytest.raises(ConflictError):
        r.add_class(ws, "class1", class_images(9, 1))
    with pytest.raises(NotFoundError):
        r.classify("ws_nope", class_images(0, 1))
    empty, _ = r.create_workspace("empty")
    with pytest.raises(ConflictError, match="no classes yet"):
        r.classify(empty.id, class_images(0, 1))
    with pytest.raises(ValueError, match=r"uint8 images of shape \(N, 1, 28, 28\)"):
        r.classify(ws, np.zeros((1, 3, 28, 28), np.uint8))


def test_workspaces_are_isolated(sqlite_store: Store) -> None:
    r, a, ids = taught(sqlite_store, 2)
    b, _ = r.create_workspace("other")
    r.add_class(b.id, "only-in-b", class_images(50, 2))
    assert {p.label for p in r.classify(b.id, class_images(0, 6)[5:], top_k=5)[0].top_k} == {"only-in-b"}
    with pytest.raises(NotFoundError):
        r.rename_class(b.id, ids[0], "stolen")


def test_explain_returns_nearest_examples_with_thumbnails(sqlite_store: Store) -> None:
    r, ws, ids = taught(sqlite_store, 3)
    e = r.explain(ws, class_images(2, 6)[5], k=3)
    assert e.prediction.class_id == ids[2]
    assert [n.class_id for n in e.neighbours] == [ids[2]] * 3
    assert all(n.thumbnail_png.startswith(b"\x89PNG") for n in e.neighbours)
    assert len({n.example_id for n in e.neighbours}) == 3
    assert r.thumbnail(ws, e.neighbours[0].example_id) == e.neighbours[0].thumbnail_png


def test_logistic_head_is_deterministic(sqlite_store: Store) -> None:
    r, ws, _ = taught(sqlite_store, 3, WorkspaceSettings(head="logistic"))
    q = class_images(1, 8)[5:]
    a = [c.probability for c in r.classify(ws, q)[0].top_k]
    fresh = Recogniser(ToyEmbedder(), sqlite_store)
    b = [c.probability for c in fresh.classify(ws, q)[0].top_k]
    assert a == b


def test_instances_sharing_a_store_see_each_others_changes(store_url: str) -> None:
    """Two recognisers (as two processes would) on one store: each sees the other's classes."""
    s1, s2 = open_store(store_url), open_store(store_url)
    try:
        r1, r2 = Recogniser(ToyEmbedder(), s1), Recogniser(ToyEmbedder(), s2)
        ws, _ = r1.create_workspace("shared")
        c0 = r1.add_class(ws.id, "zero", class_images(0, 3))
        assert r2.classify(ws.id, class_images(0, 4)[3:])[0].label == "zero"
        c1 = r2.add_class(ws.id, "one", class_images(1, 3))
        assert r1.classify(ws.id, class_images(1, 4)[3:])[0].class_id == c1.id
        r2.add_images(ws.id, c0.id, class_images(0, 6)[3:])
        p1 = r1._memory(ws.id).protos
        assert p1.counts[p1.index[c0.id]] == 6
        r2.rename_class(ws.id, c0.id, "zero!")
        r2.delete_class(ws.id, c1.id)
        p = r1.classify(ws.id, class_images(1, 4)[3:], top_k=5)[0]
        assert [c.label for c in p.top_k] == ["zero!"]
    finally:
        s1.close()
        s2.close()


def test_classify_at_10000_classes_answers_from_memory(sqlite_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """At 10,000 classes the answer is still the nearest class, and after the first call a classify
    reads no examples from the store (only the version check). Its latency is measured by
    benchmarks/bench_service.py (class counts 10 / 1,000 / 10,000), not asserted here."""
    embedder = ToyEmbedder(dim=64)
    r = Recogniser(embedder, sqlite_store, config=RecogniserConfig())
    ws, _ = r.create_workspace("big")
    rng = np.random.default_rng(0)
    # fill the memory directly through the store (embedding 10,000 images is not what is tested here)
    from fewshot.service.store import NewExample

    q = class_images(0, 1)
    for i in range(9_999):
        sqlite_store.add_class(ws.id, f"c{i}", [NewExample(rng.standard_normal(64).astype(np.float32), b"png")])
    sqlite_store.add_class(ws.id, "target", [NewExample(embedder.embed(q)[0], b"png")])
    assert r.class_count(ws.id) == 10_000
    assert r.classify(ws.id, q)[0].label == "target"
    reads: list[str] = []
    for name in ("changes", "examples"):
        original = getattr(sqlite_store, name)
        monkeypatch.setattr(sqlite_store, name, lambda *a, _n=name, _f=original, **k: (reads.append(_n), _f(*a, **k))[1])
    for _ in range(3):
        assert r.classify(ws.id, q, top_k=5)[0].top_k[0].label == "target"
    assert reads == []


def test_a_bundle_with_example_views_stores_each_image_as_the_mean_of_its_views(sqlite_store: Store) -> None:
    from fewshot.decision import DecisionRule, example_embeddings

    emb = ToyEmbedder()
    r = Recogniser(emb, sqlite_store, decision=BundleDecision(DecisionRule(views="shift4", view_shift=2)))
    ws, _ = r.create_workspace("demo")
    images = class_images(0, 3)
    rec = r.add_class(ws.id, "zero", images)
    stored = sqlite_store.examples(ws.id, [rec.id]).embeddings
    np.testing.assert_allclose(stored, example_embeddings(emb.embed, images, "shift4", 2), rtol=1e-5)
    assert not np.allclose(stored, emb.embed(images), atol=1e-3)  # not the images' own embeddings
    more = class_images(0, 5)[3:]
    r.add_images(ws.id, rec.id, more)
    assert len(sqlite_store.examples(ws.id, [rec.id]).embeddings) == 5  # still one row per image
    assert r.classify(ws.id, class_images(0, 6)[5:])[0].label == "zero"


def test_a_non_finite_view_is_reported_against_the_uploaded_image(sqlite_store: Store) -> None:
    from fewshot.decision import DecisionRule

    class NanOnShifted(ToyEmbedder):
        def embed(self, images_u8: np.ndarray) -> np.ndarray:
            z = super().embed(images_u8)
            z[-1] = np.nan  # the last view of the last image
            return z

    r = Recogniser(NanOnShifted(), sqlite_store, decision=BundleDecision(DecisionRule(views="shift4", view_shift=2)))
    ws, _ = r.create_workspace("demo")
    with pytest.raises(RequestError, match=r"embeds 1 of 3 image\(s\) \(first: number 3\)"):
        r.add_class(ws.id, "zero", class_images(0, 3))
