"""Unknown-threshold calibration on open-set episodes with a toy embedder whose geometry we know."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot.artifacts.calibration import accepts, calibrate_unknown_threshold, nearest_scores
from fewshot.errors import ConfigError


class IdentityEmbedder:
    """images (N, 1, 1, D) uint8 -> (N, D) float: lets a test place embeddings exactly."""

    embedding_dim = 4

    def embed(self, images_u8: np.ndarray) -> np.ndarray:
        return images_u8.reshape(len(images_u8), -1).astype(np.float32)


def clustered(n_classes: int, n: int, spread: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.integers(30, 220, (n_classes, 4))
    return {f"c{i}": np.clip(centres[i] + rng.integers(-spread, spread + 1, (n, 4)), 0, 255)
            .astype(np.uint8).reshape(n, 1, 1, 4) for i in range(n_classes)}


def test_threshold_meets_target_false_accept_and_accepts_known() -> None:
    data = clustered(12, 12, spread=3)
    cal = calibrate_unknown_threshold(IdentityEmbedder(), data, np.random.default_rng(0), n_way=4, n_shot=3,
                                      n_query=4, n_episodes=100, target_false_accept=0.05)
    # tight, well separated clusters: nearly every known query is accepted
    assert cal.true_accept["euclidean"] > 0.9
    # on fresh episodes the unknown false-accept rate stays near the target
    emb = {k: IdentityEmbedder().embed(v) for k, v in clustered(12, 12, spread=3, seed=0).items()}
    rng = np.random.default_rng(5)
    fa = []
    for _ in range(200):
        keys = rng.choice(sorted(emb), 5, replace=False)
        protos = np.stack([emb[k][:3].mean(0) for k in keys[:4]])
        fa.append(accepts("euclidean", nearest_scores(emb[keys[4]], protos, "euclidean"), cal.thresholds["euclidean"]))
    assert np.mean(np.concatenate(fa)) <= 0.15


def test_deterministic_given_rng() -> None:
    data = clustered(8, 8, spread=10)
    a = calibrate_unknown_threshold(IdentityEmbedder(), data, np.random.default_rng(3), n_way=3, n_shot=2, n_episodes=20)
    b = calibrate_unknown_threshold(IdentityEmbedder(), data, np.random.default_rng(3), n_way=3, n_shot=2, n_episodes=20)
    assert a == b


def test_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="at least n_way \\+ 1 = 6"):
        calibrate_unknown_threshold(IdentityEmbedder(), clustered(3, 8, 2), np.random.default_rng(0))
    with pytest.raises(ConfigError, match="too few"):
        calibrate_unknown_threshold(IdentityEmbedder(), clustered(8, 3, 2), np.random.default_rng(0))
