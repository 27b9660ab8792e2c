"""MemoEmbed: an evaluation's distinct images go through the embedder once, with the same rows."""

from __future__ import annotations

import numpy as np

from fewshot.artifacts.embedders import MemoEmbed


class Counting:
    """(N, 1, 4, 4) uint8 -> (N, 3): sum, first pixel, last pixel; counts the images it embeds."""

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.seen += len(x)
        flat = x.reshape(len(x), 16).astype(np.float32)
        return np.stack([flat.sum(1), flat[:, 0], flat[:, -1]], axis=1)


def test_each_distinct_image_is_embedded_once_and_rows_match() -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(6, 1, 4, 4), dtype=np.uint8)
    inner = Counting()
    memo = MemoEmbed(inner)
    first = memo(imgs[[0, 1, 2, 0]])  # a repeat inside one batch
    assert inner.seen == 3 and memo.embedded == 3
    second = memo(imgs[[2, 3, 1, 4]])
    assert inner.seen == 5
    direct = Counting()
    np.testing.assert_array_equal(first, direct(imgs[[0, 1, 2, 0]]))
    np.testing.assert_array_equal(second, direct(imgs[[2, 3, 1, 4]]))


def test_a_rotated_image_is_a_new_image() -> None:
    img = np.arange(16, dtype=np.uint8).reshape(1, 1, 4, 4)
    inner = Counting()
    memo = MemoEmbed(inner)
    a = memo(img)
    b = memo(np.rot90(img, 1, axes=(2, 3)))
    assert inner.seen == 2 and a[0, 1] != b[0, 1]
    assert memo(np.zeros((0, 1, 4, 4), dtype=np.uint8)).shape == (0, 3)
