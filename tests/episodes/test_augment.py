"""Seeded RGB augmentations: random resized crop and colour jitter."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot.episodes.materialise import Augment, augment, colour_jitter, crop_boxes, resized_crop
from fewshot.errors import EpisodeError

RGB = Augment(rrc_scale=(0.2, 1.0), color_jitter=0.4, hue_jitter=0.1, hflip=True)


def photos(n: int = 16, size: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def test_same_rng_same_output_and_different_rng_different_output() -> None:
    x = photos()
    a = augment(x, RGB, np.random.default_rng(7))
    b = augment(x, RGB, np.random.default_rng(7))
    c = augment(x, RGB, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_output_shape_dtype_and_range_and_input_untouched() -> None:
    x = photos()
    before = x.copy()
    y = augment(x, RGB, np.random.default_rng(0))
    assert y.shape == x.shape and y.dtype == np.uint8
    assert np.array_equal(x, before)
    assert not np.array_equal(y, x)


def test_off_is_unchanged() -> None:
    x = photos()
    assert not Augment().active
    assert np.array_equal(augment(x, Augment(), np.random.default_rng(0)), x)


def test_boxes_follow_the_scale_and_ratio_ranges() -> None:
    boxes = crop_boxes(2000, 84, 84, (0.25, 0.5), (0.75, 4 / 3), np.random.default_rng(0))
    y0, x0, bh, bw = boxes.T
    frac = bh * bw / 84**2
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + bh <= 84).all() and (x0 + bw <= 84).all()
    assert frac.min() > 0.23 and frac.max() < 0.52  # rounding to whole pixels moves the area a little
    assert (bw / bh).min() > 0.72 and (bw / bh).max() < 1.39
    assert frac.std() > 0.05  # spread over the range, not one size


def test_a_box_of_the_whole_image_gives_the_image_back() -> None:
    x = photos(2, 9)
    whole = np.array([[0, 0, 9, 9], [0, 0, 9, 9]], dtype=np.float64)
    assert np.array_equal(resized_crop(x, whole), x)


def test_resized_crop_magnifies_the_box() -> None:
    x = np.zeros((1, 3, 8, 8), np.uint8)
    x[0, :, :4, :4] = 200  # the top-left quarter is bright
    out = resized_crop(x, np.array([[0, 0, 4, 4]], dtype=np.float64))
    assert int(out.min()) == 200  # the quarter now fills the image


def test_unit_factors_and_no_hue_leave_images_alone() -> None:
    x = photos(4)
    assert np.array_equal(colour_jitter(x, 0.0, 0.0, np.random.default_rng(0)), x)


def test_saturation_towards_zero_makes_grey() -> None:
    x = photos(64)
    y = colour_jitter(x, 0.99, 0.0, np.random.default_rng(1))
    spread_in = np.ptp(x.astype(int), axis=1).mean(axis=(1, 2))
    spread_out = np.ptp(y.astype(int), axis=1).mean(axis=(1, 2))
    assert (spread_out < spread_in).sum() > 16 and (spread_out > spread_in).sum() > 16  # both ways


def test_hue_rotation_keeps_grey_pixels_grey() -> None:
    grey = np.full((3, 3, 5, 5), 128, np.uint8)
    y = colour_jitter(grey, 0.0, 0.5, np.random.default_rng(0))
    assert np.abs(y.astype(int) - 128).max() <= 1


def test_grayscale_images_refuse_colour_jitter() -> None:
    with pytest.raises(EpisodeError, match="1 channel.*color_jitter"):
        augment(np.zeros((2, 1, 8, 8), np.uint8), Augment(color_jitter=0.4), np.random.default_rng(0))
    out = augment(np.zeros((2, 1, 8, 8), np.uint8), Augment(rrc_scale=(0.5, 1.0)), np.random.default_rng(0))
    assert out.shape == (2, 1, 8, 8)  # the crop works on any channels


@pytest.mark.parametrize("kwargs, word", [
    ({"rrc_scale": (0.0, 1.0)}, "rrc_scale"), ({"rrc_scale": (0.9, 0.5)}, "rrc_scale"),
    ({"rrc_ratio": (2.0, 1.0)}, "rrc_ratio"), ({"color_jitter": 1.0}, "color_jitter"),
    ({"hue_jitter": 0.7}, "hue_jitter"),
])
def test_bad_settings_are_refused(kwargs: dict, word: str) -> None:
    with pytest.raises(EpisodeError, match=word):
        Augment(**kwargs)


def test_train_config_fields_default_off_and_are_checked() -> None:
    from fewshot.config import load_config
    from fewshot.errors import ConfigError

    tc = load_config(None).train
    assert tc.rrc_scale is None and tc.color_jitter == 0 and tc.hue_jitter == 0
    tc = load_config(None, ["train.rrc_scale=[0.08, 1.0]", "train.color_jitter=0.4"]).train
    assert tc.rrc_scale == (0.08, 1.0) and tc.color_jitter == 0.4
    with pytest.raises(ConfigError, match="rrc_scale"):
        load_config(None, ["train.rrc_scale=[0.9, 0.5]"])
    with pytest.raises(ConfigError, match="color_jitter"):
        load_config(None, ["train.color_jitter=1.5"])


def test_pre_training_batches_are_augmented_reproducibly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fewshot.data.cache import ClassInfo, PackedCache, write_cache
    from fewshot.data.imageio import Preprocessing
    from fewshot.episodes.batches import sample_batch
    from fewshot.episodes.materialise import pool_from_split

    classes = [ClassInfo("a", "d", "", 0, 8), ClassInfo("b", "d", "", 8, 8)]
    write_cache(tmp_path / "c", photos(16, 10), classes, [f"{i}.png" for i in range(16)], Preprocessing("RGB", 10), "fp")
    cache = PackedCache.open(tmp_path / "c")

    class Split:
        name, class_ids, rotations = "train", np.arange(2), np.zeros(2, dtype=np.int64)

    pool = pool_from_split(cache, Split())
    plain, _ = sample_batch(cache, pool, 8, seed=0, index=3)
    a, ya = sample_batch(cache, pool, 8, seed=0, index=3, aug=RGB)
    b, yb = sample_batch(cache, pool, 8, seed=0, index=3, aug=RGB)
    assert a.equal(b) and ya.equal(yb) and not a.equal(plain)
