"""`prototype_scores` on numpy arrays (the service's path: numpy for small problems, torch for large
ones) against the definitions: squared distances from the differences, cosines from the norms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot.decision import Metric, prototype_scores
from fewshot.decision.rule import SMALL_SCORES


def _definition(q: np.ndarray, p: np.ndarray, metric: str) -> np.ndarray:
    q64, p64 = q.astype(np.float64), p.astype(np.float64)
    if metric == "euclidean":
        return ((q64[:, None, :] - p64[None, :, :]) ** 2).sum(-1)
    qn = np.linalg.norm(q64, axis=1)[:, None]
    pn = np.linalg.norm(p64, axis=1)[None, :]
    return (q64 @ p64.T) / (np.maximum(qn, 1e-12) * np.maximum(pn, 1e-12))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("shape", [(1, 20, 64), (3, 40, 1280)], ids=["small-numpy", "large-torch"])
def test_numpy_scores_follow_the_definition_and_the_torch_path(metric: Metric, shape: tuple[int, int, int]) -> None:
    n, k, d = shape
    assert (n * k * d <= SMALL_SCORES) == (shape == (1, 20, 64))  # the two cases take the two paths
    rng = np.random.default_rng(0)
    q = rng.normal(size=(n, d)).astype(np.float32)
    p = rng.normal(size=(k, d)).astype(np.float32)
    p[0] = 0.0  # an all-zero prototype: cosine 0, not NaN
    got = prototype_scores(q, p, metric)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (n, k)
    np.testing.assert_allclose(got, _definition(q, p, metric), rtol=1e-4, atol=1e-3)
    via_torch = prototype_scores(torch.from_numpy(q), torch.from_numpy(p), metric).numpy()
    np.testing.assert_allclose(got, via_torch, rtol=1e-5, atol=1e-4)
    with_norms = prototype_scores(q, p, metric, (p * p).sum(1))
    np.testing.assert_allclose(with_norms, got, rtol=1e-6, atol=1e-5)


def test_mixed_arrays_and_tensors_are_refused() -> None:
    with pytest.raises(TypeError, match="not a mix"):
        prototype_scores(torch.zeros(1, 4), np.zeros((2, 4), np.float32), "euclidean")  # type: ignore[call-overload]
