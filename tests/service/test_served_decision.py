"""The service answers with the bundle's decision: the class it answers is the class it judges, and
the bundle's cosine scale and probe regularisation are the ones it serves (divergences of issue 17)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from service_helpers import class_images

from fewshot.artifacts import export_bundle
from fewshot.backbones import create_backbone
from fewshot.data.imageio import Preprocessing
from fewshot.decision import DecisionRule, fit_probe
from fewshot.service.models import load_models
from fewshot.service.recogniser import Recogniser, WorkspaceSettings
from fewshot.service.settings import ServiceSettings
from fewshot.service.store import SQLiteStore, Store


class PixelEmbedder:
    """uint8 images (N, 1, 2, 2) -> their 4 pixel values as the embedding: places embeddings exactly."""

    embedding_dim, channels, size = 4, 1, 2

    def embed(self, images_u8: np.ndarray) -> np.ndarray:
        return images_u8.reshape(len(images_u8), 4).astype(np.float32)


def images(*rows: list[int]) -> np.ndarray:
    return np.asarray(rows, np.uint8).reshape(len(rows), 1, 2, 2)


def test_the_logistic_head_judges_the_class_it_answers(sqlite_store: Store) -> None:
    """Class "far" lies along the query's direction (the probe's answer, on normalised embeddings)
    but far away; class "near" is the nearest prototype. Before, "known", novelty and score were
    judged on "near" while the label was "far"."""
    r = Recogniser(PixelEmbedder(), sqlite_store)
    ws, _ = r.create_workspace("w", WorkspaceSettings("euclidean", "logistic", threshold=1000.0))
    r.add_class(ws.id, "far", images([200, 0, 0, 0], [200, 10, 0, 0]))
    r.add_class(ws.id, "near", images([10, 10, 0, 0], [12, 8, 0, 0]))
    p = r.classify(ws.id, images([20, 0, 0, 0]), top_k=2, threshold=1e9)[0]
    assert p.label == "far" and min(p.top_k, key=lambda c: c.score).label == "near"  # probe != nearest
    far = next(c for c in p.top_k if c.label == "far")
    assert p.score == far.score == pytest.approx(180.0**2 + 25.0)
    strict = r.classify(ws.id, images([20, 0, 0, 0]))[0]  # threshold 1000: "near" (d^2 = 181) would pass
    assert not strict.known and strict.label == "unknown" and strict.novelty == pytest.approx(180.0**2 + 25.0)


def tiny_bundle_with(out: Path, rule: DecisionRule) -> Path:
    """An untrained Conv-4 bundle (grayscale 28 px) served with `rule`."""
    backbone = create_backbone("conv4", in_channels=1, image_size=28, hidden=8, generator=torch.Generator().manual_seed(0))
    return export_bundle(backbone, out, preprocessing=Preprocessing("L", 28), source={"run": "test"}, metrics={},
                         data_fingerprint="synthetic", calibration=None,
                         sample_images=np.concatenate([class_images(s, 2) for s in range(4)]),
                         deployment={"embedder": "backbone", "rule": rule.to_dict()})


def classes(r: Recogniser, ws: str) -> tuple[np.ndarray, np.ndarray]:
    """Teach three classes of a few images; return (stored embeddings (N, D), class index (N,))."""
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for c in range(3):
        imgs = np.clip(rng.integers(0, 256, (1, 1, 28, 28)) + rng.integers(-30, 31, (4, 1, 28, 28)), 0, 255)
        r.add_class(ws, f"c{c}", imgs.astype(np.uint8))
        xs.append(r.embedder.embed(imgs.astype(np.uint8)))
        ys.append(np.full(4, c))
    return np.concatenate(xs), np.concatenate(ys)


def test_the_service_serves_the_bundles_cosine_scale(tmp_path: Path) -> None:
    bundle = tiny_bundle_with(tmp_path / "b", DecisionRule("prototype", "cosine", cosine_scale=2.5))
    store = SQLiteStore(tmp_path / "s.db")
    r = load_models(ServiceSettings(bundle_path=str(bundle), db_url=str(tmp_path / "s.db")), store).default.recogniser
    ws, _ = r.create_workspace("w")
    x, y = classes(r, ws.id)
    p = r.classify(ws.id, np.zeros((1, 1, 28, 28), np.uint8) + 128, top_k=3)[0]
    cos = np.asarray([c.score for c in p.top_k])
    logits = 2.5 * cos
    np.testing.assert_allclose([c.probability for c in p.top_k], np.exp(logits) / np.exp(logits).sum(), rtol=1e-4)
    store.close()


def test_the_service_serves_the_bundles_probe_regularisation(tmp_path: Path) -> None:
    rule = DecisionRule("probe", "euclidean", probe_c=0.01, probe_max_iter=40)
    bundle = tiny_bundle_with(tmp_path / "b", rule)
    store = SQLiteStore(tmp_path / "s.db")
    r = load_models(ServiceSettings(bundle_path=str(bundle), db_url=str(tmp_path / "s.db")), store).default.recogniser
    ws, _ = r.create_workspace("w")
    x, y = classes(r, ws.id)
    q = np.zeros((1, 1, 28, 28), np.uint8) + 128
    p = r.classify(ws.id, q, top_k=3)[0]
    got = {c.label: c.probability for c in p.top_k}
    zq = torch.from_numpy(r.embedder.embed(q))
    for c, expect in ((0.01, True), (1.0, False)):  # the bundle's C, not the default 1.0
        probe = fit_probe(torch.from_numpy(x), torch.from_numpy(y), 3, c=c, max_iter=40)
        probs = torch.softmax(probe.logits(zq), 1)[0].numpy()
        assert np.allclose([got[f"c{k}"] for k in range(3)], probs, rtol=1e-4, atol=1e-6) == expect
    store.close()
