"""Koch et al.'s random affine distortions for characters (`train.affine`)."""

from __future__ import annotations

import numpy as np

from fewshot.episodes.materialise import (
    AFFINE_SCALE,
    AFFINE_TRANSLATE,
    Augment,
    affine_matrices,
    augment,
    warp,
)


def characters(n: int = 8, size: int = 28, seed: int = 0) -> np.ndarray:
    """White pages with a few dark strokes."""
    rng = np.random.default_rng(seed)
    x = np.full((n, 1, size, size), 255, np.uint8)
    for i in range(n):
        r = rng.integers(6, size - 6)
        x[i, 0, r, 4:-4] = 0
        x[i, 0, 4:-4, r] = 0
    return x


def test_seeded_and_the_input_untouched() -> None:
    x = characters()
    before = x.copy()
    a = augment(x, Augment(affine=True), np.random.default_rng(3))
    assert np.array_equal(a, augment(x, Augment(affine=True), np.random.default_rng(3)))
    assert not np.array_equal(a, augment(x, Augment(affine=True), np.random.default_rng(4)))
    assert a.shape == x.shape and a.dtype == np.uint8 and np.array_equal(x, before)
    assert Augment(affine=True).active


def test_identity_keeps_the_image_and_a_shift_moves_it_by_whole_pixels() -> None:
    x = characters(2)
    identity = np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (2, 1, 1))
    assert np.array_equal(warp(x, identity), x)
    shift = identity.copy()
    shift[:, 0, 2] = 2 * 2 / 28  # sample 2 pixels to the right: the content moves 2 pixels left
    moved = warp(x, shift)
    assert np.array_equal(moved[..., :-2], x[..., 2:])
    assert (moved[..., -2:] == x[..., -1:]).all()  # the border's value comes in


def test_a_blank_page_stays_blank() -> None:
    page = np.full((16, 1, 28, 28), 255, np.uint8)
    assert (augment(page, Augment(affine=True), np.random.default_rng(0)) == 255).all()


def test_the_distortions_follow_koch_et_al() -> None:
    m = affine_matrices(20000, 28, 28, np.random.default_rng(0))
    a, t = m[:, :, :2], m[:, :, 2]
    untouched = np.all(a == np.eye(2), axis=(1, 2)) & np.all(t == 0, axis=1)
    assert abs(untouched.mean() - 1 / 16) < 0.01  # each of four components present with probability 0.5
    assert abs((t != 0).any(axis=1).mean() - 0.5) < 0.02
    assert np.abs(t).max() <= AFFINE_TRANSLATE * 2 + 1e-12
    det = np.linalg.det(a)  # rotation keeps the area, shear scales it by 1 - s1 s2 in [0.91, 1.09], scales by sx sy
    lo, hi = AFFINE_SCALE
    assert det.min() >= lo * lo * 0.91 - 1e-9 and det.max() <= hi * hi * 1.09 + 1e-9
    only_rotation = np.isclose(det, 1.0) & np.isclose(a[:, 0, 1], -a[:, 1, 0]) & (a[:, 0, 1] != 0)
    angles = np.degrees(np.arctan2(a[only_rotation, 1, 0], a[only_rotation, 0, 0]))
    assert angles.size > 500 and np.abs(angles).max() <= 10.0 + 1e-9 and np.abs(angles).max() > 9.0
