"""Preprocessing: manifest round trip, older manifests, validation, centre crop, mean/std model input."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from fewshot.data.imageio import Preprocessing, decode_image, from_model_input, model_input
from fewshot.errors import ImageError


def png(arr_hwc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr_hwc).save(buf, format="PNG")
    return buf.getvalue()


def test_manifest_round_trip_keeps_every_field() -> None:
    pre = Preprocessing("RGB", 16, "bicubic", crop=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    again = Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert again == pre
    assert again.mean == (0.485, 0.456, 0.406) and again.std == (0.229, 0.224, 0.225) and again.crop == 0.875


def test_older_manifests_without_the_new_keys_load_and_write_the_same() -> None:
    old = {"mode": "L", "size": 28, "resample": "lanczos"}
    pre = Preprocessing.from_dict(old)
    assert pre.mean is None and pre.std is None and pre.crop == 1.0
    assert pre.to_dict() == old  # cache keys and manifests of existing data are unchanged


@pytest.mark.parametrize("kwargs, words", [
    ({"mean": (0.5,), "std": (0.2, 0.2, 0.2)}, ["mean [0.5]", "3 channel"]),
    ({"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2)}, ["std [0.2, 0.2]", "3 channel"]),
    ({"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.0, 0.2)}, ["std (0.2, 0.0, 0.2)", "> 0"]),
    ({"mean": (0.5, 0.5, 0.5)}, ["give both or neither"]),
    ({"crop": 0.0}, ["crop 0.0", "(0, 1]"]),
    ({"crop": 1.5}, ["crop 1.5"]),
    ({"resample": "cubic"}, ["'cubic'", "bicubic"]),
])
def test_bad_preprocessing_is_refused_naming_the_value(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ImageError) as info:
        Preprocessing("RGB", 16, **kwargs)
    for w in words:
        assert w in str(info.value)


def test_bad_lengths_in_a_manifest_are_refused() -> None:
    with pytest.raises(ImageError, match="1 channel"):
        Preprocessing.from_dict({"mode": "L", "size": 28, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]})


def test_model_input_is_identity_scale_without_mean_std() -> None:
    x = np.array([0, 51, 255], dtype=np.uint8).reshape(1, 1, 1, 3)
    np.testing.assert_allclose(model_input(x, Preprocessing("L", 3)), [[[[0.0, 0.2, 1.0]]]], atol=1e-7)


def test_model_input_normalises_each_channel() -> None:
    pre = Preprocessing("RGB", 2, mean=(0.5, 0.0, 1.0), std=(0.5, 0.25, 2.0))
    x = np.zeros((1, 3, 2, 2), dtype=np.uint8)
    x[0, :, 0, 0] = 255
    got = model_input(x, pre)
    assert got.dtype == np.float32 and got.shape == (1, 3, 2, 2)
    np.testing.assert_allclose(got[0, :, 0, 0], [1.0, 4.0, 0.0], atol=1e-6)  # white
    np.testing.assert_allclose(got[0, :, 1, 1], [-1.0, 0.0, -0.5], atol=1e-6)  # black


def test_model_input_refuses_the_wrong_channels() -> None:
    with pytest.raises(ImageError, match=r"\(N, 3, H, W\)"):
        model_input(np.zeros((1, 1, 2, 2), np.uint8), Preprocessing("RGB", 2))


def test_from_model_input_gives_back_the_pixels() -> None:
    pre = Preprocessing("RGB", 5, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x = np.random.default_rng(0).integers(0, 256, (4, 3, 5, 5), dtype=np.uint8)
    assert np.array_equal(from_model_input(model_input(x, pre), pre), x)


def test_centre_crop_keeps_the_centre_of_the_resized_image() -> None:
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :] = (0, 255, 0)
    img[:2, :] = img[-2:, :] = img[:, :2] = img[:, -2:] = (255, 0, 0)  # a 2-pixel red frame
    whole = decode_image(png(img), Preprocessing("RGB", 28, "nearest"))
    cropped = decode_image(png(img), Preprocessing("RGB", 28, "nearest", crop=0.875))  # 32 -> crop 28
    assert whole.shape == cropped.shape == (3, 28, 28)
    assert whole[0, 0, 0] == 255 and whole[0, 14, 14] == 0  # the frame survives a plain resize
    assert int(cropped[0].max()) == 0 and int(cropped[1].min()) == 255  # only the green centre is left


def test_bicubic_is_a_resampling_filter() -> None:
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    a = decode_image(png(img), Preprocessing("RGB", 16, "bicubic"))
    b = decode_image(png(img), Preprocessing("RGB", 16, "bilinear"))
    assert a.shape == (3, 16, 16) and not np.array_equal(a, b)
