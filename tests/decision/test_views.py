"""Example views (fewshot.decision.views): which pixels each view holds, the mean a taught image
stores, how a rule names them, and that calibration teaches through them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot.artifacts.calibration import open_set_episode
from fewshot.decision import DecisionRule, default_shift, example_embeddings, view_images
from fewshot.errors import ConfigError


def dot_image() -> np.ndarray:
    """uint8 (1, 1, 3, 3): 0 everywhere, 90 at the centre."""
    x = np.zeros((1, 1, 3, 3), np.uint8)
    x[0, 0, 1, 1] = 90
    return x


def test_shifted_views_move_the_picture_by_the_shift_in_each_diagonal_direction() -> None:
    views = view_images(dot_image(), "shift4", 1)
    assert len(views) == 5 and np.array_equal(views[0], dot_image())
    # where the centre dot lands in each corner crop of the image padded by 1 pixel
    assert [tuple(np.argwhere(v[0, 0] == 90)[0]) for v in views[1:]] == [(2, 2), (2, 0), (0, 2), (0, 0)]


def test_shifted_views_repeat_the_edge_not_black() -> None:
    x = np.full((1, 1, 4, 4), 200, np.uint8)
    x[0, 0, :, 0] = 10  # a dark left column
    views = view_images(x, "shift4", 1)[1:]
    assert all((v == 0).sum() == 0 for v in views)  # no zero padding anywhere
    for v in views[0], views[2]:  # moved right by a pixel: the dark edge column is repeated
        assert (v[0, 0, :, :2] == 10).all() and (v[0, 0, :, 2:] == 200).all()
    for v in views[1], views[3]:  # moved left: the dark column is cut off
        assert (v == 200).all()


def test_mirrored_views_flip_left_and_right_only() -> None:
    x = np.arange(2 * 3 * 2 * 3, dtype=np.uint8).reshape(2, 3, 2, 3)
    plain, mirrored = view_images(x, "mirror", 0)
    assert np.array_equal(mirrored[..., 0], x[..., 2]) and np.array_equal(mirrored[..., 1], x[..., 1])
    assert len(view_images(np.zeros((1, 3, 4, 4), np.uint8), "shift4+mirror", 1)) == 10


def test_tensor_views_hold_the_same_pixels_as_array_views() -> None:
    x = np.random.default_rng(0).integers(0, 256, (3, 2, 6, 6)).astype(np.uint8)
    for views in ("shift4", "shift4+mirror", "mirror"):
        a = view_images(x, views, 2)
        t = view_images(torch.from_numpy(x), views, 2)
        assert len(a) == len(t)
        for u, v in zip(a, t):
            assert np.array_equal(u, v.numpy())


def test_a_taught_image_stores_the_mean_over_its_views() -> None:
    def flat(images: np.ndarray) -> np.ndarray:  # an "embedding" that is the picture itself
        return images.reshape(len(images), -1).astype(np.float32)

    z = example_embeddings(flat, dot_image(), "shift4", 1)
    # the dot at the centre in 1 of 5 views and at each corner in 1 of 5: 90 / 5 = 18 at those five
    expect = np.array([[18, 0, 18], [0, 18, 0], [18, 0, 18]], np.float32).reshape(1, 9)
    np.testing.assert_allclose(z, expect)
    np.testing.assert_array_equal(example_embeddings(flat, dot_image(), "none", 0), flat(dot_image()))


def test_all_views_go_through_the_embedder_in_one_call() -> None:
    calls: list[int] = []

    def counting(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        return np.zeros((len(images), 4), np.float32)

    assert example_embeddings(counting, np.zeros((7, 1, 8, 8), np.uint8), "shift4", 2).shape == (7, 4)
    assert calls == [35]


def test_a_rule_names_its_views_and_old_rules_have_none() -> None:
    rule = DecisionRule("prototype", "euclidean", views="shift4", view_shift=2)
    assert DecisionRule.from_dict(rule.to_dict()) == rule
    old = {"rule": "prototype", "metric": "cosine", "cosine_scale": 10.0, "probe_c": 1.0, "probe_max_iter": 100}
    assert DecisionRule.from_dict(old).views == "none"  # a bundle exported before views


@pytest.mark.parametrize(("views", "shift", "names"), [("shift8", 2, "shift8"), ("shift4", 0, "at least 1 pixel"),
                                                      ("mirror", -1, "-1")])
def test_bad_views_are_refused_naming_the_value(views: str, shift: int, names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        DecisionRule(views=views, view_shift=shift)


def test_the_default_shift_follows_the_image_size() -> None:
    assert [default_shift(s) for s in (8, 28, 84, 224)] == [1, 2, 6, 16]


def test_calibration_teaches_classes_with_the_example_embeddings() -> None:
    rng = np.random.default_rng(0)
    emb = [rng.normal(c, 1.0, (6, 4)).astype(np.float32) for c in range(5)]
    # every taught example of a class is its class mean: a class taught from these has no spread
    examples = [np.repeat(e.mean(0, keepdims=True), len(e), axis=0) for e in emb]
    plain = open_set_episode(emb, np.random.default_rng(1), n_way=3, n_shot=3, n_query=2)["euclidean"]
    viewed = open_set_episode(emb, np.random.default_rng(1), n_way=3, n_shot=3, n_query=2,
                              examples_by_class=examples)["euclidean"]
    assert (plain.spread > 0).all() and np.allclose(viewed.spread, 0)
    assert np.array_equal(plain.known, viewed.known)  # the same queries, drawn the same way


def test_a_shift_of_half_the_side_or_more_is_refused_naming_the_fix() -> None:
    with pytest.raises(ConfigError, match="too large for 8x8 images"):
        view_images(np.zeros((1, 1, 8, 8), np.uint8), "shift4", 4)
    assert len(view_images(np.zeros((1, 1, 8, 8), np.uint8), "shift4", 3)) == 5


def test_no_images_give_no_rows() -> None:
    z = example_embeddings(lambda x: np.zeros((len(x), 4), np.float32), np.zeros((0, 1, 8, 8), np.uint8), "shift4", 1)
    assert z.shape == (0, 4)
