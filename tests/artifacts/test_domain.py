"""The training domain of a bundle: image statistics, the embedding summary, verdicts, the manifest."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from artifact_helpers import export_tiny, sample_images, tiny_backbone
from PIL import Image

from fewshot.artifacts import TorchEmbedder, load_bundle
from fewshot.artifacts.bundle import MANIFEST, Manifest
from fewshot.artifacts.domain import (
    BLANK,
    FAR,
    DomainSummary,
    ImageStats,
    cross_fitted_embeddings,
    image_statistics,
    model_image_statistics,
    small_rgb,
    summarise_domain,
    summarise_embeddings,
    upload_statistics,
)
from fewshot.data.imageio import Preprocessing, decode_image
from fewshot.errors import CheckpointError


# -- helpers ----------------------------------------------------------------------------------------
class PixelEmbedder:
    """uint8 (N, 1, 4, 4) -> the 16 pixel values / 255 as the embedding (a known distribution)."""

    embedding_dim = 16

    def embed(self, images_u8: np.ndarray) -> np.ndarray:
        return images_u8.reshape(len(images_u8), -1).astype(np.float32) / 255.0


def gaussian_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 1, 4, 4) uint8 around 128, pixel j with std 2 + j (so every direction has its own scale)."""
    sd = 2.0 + np.arange(16, dtype=np.float64)
    return np.clip(np.rint(128 + rng.normal(size=(n, 16)) * sd), 0, 255).astype(np.uint8).reshape(n, 1, 4, 4)


def character(rng: np.random.Generator, side: int = 48) -> np.ndarray:
    """A black stroke or two on white, uint8 (side, side, 3): an Omniglot-like upload."""
    img = np.full((side, side), 255, np.uint8)
    for _ in range(2):
        r, c0 = int(rng.integers(8, side - 8)), int(rng.integers(4, side // 2))
        img[r:r + 3, c0:c0 + side // 3] = 0
        img[c0:c0 + side // 3, r:r + 3] = 0
    return np.repeat(img[:, :, None], 3, axis=2)


def photo(rng: np.random.Generator, side: int = 32) -> np.ndarray:
    """Smooth colourful uint8 (side, side, 3): a photo-like upload."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    base = np.stack([0.5 + 0.4 * np.sin(6 * xx + rng.uniform(0, 6)), 0.4 + 0.3 * np.cos(5 * yy),
                     0.3 + 0.2 * xx * yy], axis=2)
    return np.clip(255 * (base + rng.normal(scale=0.05, size=base.shape)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def gaussian_summary() -> DomainSummary:
    rng = np.random.default_rng(0)
    stats = [image_statistics(character(rng)) for _ in range(300)]
    return summarise_domain(PixelEmbedder(), gaussian_images(2000, rng), stats, mode="L", size=4,
                            rng=np.random.default_rng(1), trained_on="test characters", components=4)


# -- image statistics -------------------------------------------------------------------------------
def test_grayscale_has_no_colour_and_a_colourful_image_has_much() -> None:
    rng = np.random.default_rng(0)
    gray = image_statistics(character(rng))
    assert gray.colourfulness == 0.0  # R = G = B
    halves = np.zeros((32, 32, 3), np.uint8)
    halves[:, :16, 0] = 255  # red | green
    halves[:, 16:, 1] = 255
    assert image_statistics(halves).colourfulness > 109  # Hasler & Süsstrunk's "extremely colourful"
    blue_yellow = np.zeros((32, 32, 3), np.uint8)
    blue_yellow[:, :16, 2] = 255  # only the yellow-blue opponent channel varies
    blue_yellow[:, 16:, :2] = 255
    assert image_statistics(blue_yellow).colourfulness > 109
    assert image_statistics(photo(rng)).colourfulness > 15  # above "not colourful"


def test_statistics_of_flat_and_ink_images() -> None:
    white = image_statistics(np.full((8, 8, 3), 255, np.uint8))
    assert (white.mean_intensity, white.contrast, white.background_fraction, white.midtone_fraction) == (1.0, 0.0, 1.0, 0.0)
    assert image_statistics(np.zeros((8, 8, 3), np.uint8)).mean_intensity == 0.0
    ink = image_statistics(character(np.random.default_rng(0)))
    assert ink.midtone_fraction == 0.0 and ink.background_fraction > 0.7
    ramp = np.repeat(np.repeat(np.arange(64, dtype=np.uint8)[None, :] * 4, 64, axis=0)[:, :, None], 3, axis=2)
    mid = image_statistics(ramp)
    assert 0.4 < mid.midtone_fraction < 0.6 and mid.background_fraction <= 0.07


def test_image_statistics_refuses_what_it_cannot_take() -> None:
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\).*small_rgb"):
        image_statistics(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="at most 64 px.*100x100"):
        image_statistics(np.zeros((100, 100, 3), np.uint8))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16", "LA"])
def test_small_rgb_takes_any_mode(mode: str) -> None:
    img = Image.new("RGBA", (300, 150), (255, 0, 0, 0)).convert(mode)
    out = small_rgb(img)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and max(out.shape[:2]) == 32
    if mode in ("RGBA", "LA"):
        assert (out == 255).all()  # transparent goes onto white, as in decoding
    image_statistics(out)


def test_upload_statistics_of_a_png_file_and_model_inputs_agree_on_grayscale() -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(character(rng, side=105)).save(buf, format="PNG")
    s = upload_statistics(buf.getvalue())
    assert isinstance(s, ImageStats) and s.colourfulness == 0.0 and s.mean_intensity > 0.8
    x = decode_image(buf.getvalue(), Preprocessing("L", 28))[None]
    (m,) = model_image_statistics(x)
    assert m.colourfulness == 0.0 and abs(m.mean_intensity - s.mean_intensity) < 0.05
    big = np.repeat(x, 3, axis=1)
    big = np.asarray(Image.fromarray(big[0].transpose(1, 2, 0)).resize((96, 96))).transpose(2, 0, 1)[None]
    assert len(model_image_statistics(big)) == 1  # larger than 64 px: downscaled first


# -- the embedding summary --------------------------------------------------------------------------
def test_embedding_threshold_is_calibrated_on_held_out_gaussian_points() -> None:
    rng = np.random.default_rng(0)
    sd = np.linspace(0.5, 3.0, 8)
    s = summarise_embeddings(rng.normal(size=(4000, 8)) * sd, rng.normal(size=(2000, 8)) * sd, components=3)
    fresh = s.score(rng.normal(size=(20000, 8)) * sd)
    assert 0.002 < (fresh > 1).mean() < 0.012  # ~0.5% by construction, on points it never saw
    along_top = np.zeros((1, 8))
    along_top[0, -1] = 12 * sd[-1]  # far along the largest-variance direction (in the subspace)
    off_plane = np.zeros((1, 8))  # far off the 3-d subspace: 5x the typical residual length
    off_plane[0, 0] = 5 * np.sqrt((sd[:5] ** 2).sum())
    assert s.score(along_top)[0] > 1.5 and s.score(off_plane)[0] > 1.5
    # the subspace is that of the 3 largest variances (the last 3 axes here)
    assert np.allclose(s.variances, sd[::-1][:3] ** 2, rtol=0.15)
    assert (s.basis[:, 5:] ** 2).sum() > 0.95 * 3


def classes_of_points(n_classes: int, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n_classes * per_class, 8) points: each class a random centre (sd 1..3 by axis) plus noise (sd 0.5)."""
    sd = np.linspace(1.0, 3.0, 8)
    centres = rng.normal(size=(n_classes, 8)) * sd
    groups = np.repeat(np.arange(n_classes), per_class)
    return centres[groups] + rng.normal(size=(len(groups), 8)) * 0.5, groups


def test_cross_fitted_threshold_holds_on_classes_it_never_saw() -> None:
    """Calibrated with every class held out in turn, the threshold flags about 0.5% of the points of
    new classes."""
    rng = np.random.default_rng(0)
    z, groups = classes_of_points(200, 20, rng)
    s = cross_fitted_embeddings(z, groups, np.random.default_rng(1), components=3)
    assert s.n_held_out == s.n_fit == len(z)  # every point calibrates
    new, _ = classes_of_points(1000, 20, rng)
    assert 0.002 < (s.score(new) > 1).mean() < 0.012
    with pytest.raises(ValueError, match="too few for 5 folds"):
        cross_fitted_embeddings(z[:80], groups[:80], rng, components=3)  # 4 classes


def test_summarise_domain_holds_out_whole_classes_when_given_them() -> None:
    rng = np.random.default_rng(0)
    images, stats = gaussian_images(600, rng), [image_statistics(character(rng)) for _ in range(10)]
    groups = np.repeat(np.arange(30), 20)
    s = summarise_domain(PixelEmbedder(), images, stats, mode="L", size=4, rng=np.random.default_rng(1),
                         components=4, groups=groups)
    assert s.embedding.n_held_out == 600
    with pytest.raises(ValueError, match="class of each of the 600 images"):
        summarise_domain(PixelEmbedder(), images, stats, mode="L", size=4, rng=np.random.default_rng(1),
                         groups=groups[:10])


def test_embedding_summary_refuses_too_few_points_and_wrong_dims() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="too few.*>= 200 held out"):
        summarise_embeddings(rng.normal(size=(500, 8)), rng.normal(size=(50, 8)))
    s = summarise_embeddings(rng.normal(size=(500, 8)), rng.normal(size=(300, 8)), components=3)
    with pytest.raises(ValueError, match=r"\(N, 8\).*\(4, 5\)"):
        s.score(np.zeros((4, 5)))


# -- verdicts ---------------------------------------------------------------------------------------
def test_in_domain_images_pass_and_far_embeddings_are_flagged(gaussian_summary: DomainSummary) -> None:
    rng = np.random.default_rng(5)
    z = PixelEmbedder().embed(gaussian_images(1000, rng))
    verdicts = gaussian_summary.check(z)
    assert np.mean([v.out_of_domain for v in verdicts]) < 0.03
    far = z[:10].copy()
    far[:, :8] += 0.4  # ~50 grey levels on the 8 pixels with the smallest spread
    flagged = gaussian_summary.check(far)
    assert all(v.out_of_domain and v.reasons == (FAR,) and v.score > 1 for v in flagged)


def test_colour_photos_are_flagged_with_reasons_for_users(gaussian_summary: DomainSummary) -> None:
    rng = np.random.default_rng(6)
    z = PixelEmbedder().embed(gaussian_images(3, rng))  # embeddings in domain: only the image tells
    ok = gaussian_summary.check(z, [image_statistics(character(rng)) for _ in range(3)])
    assert not any(v.out_of_domain for v in ok) and all(v.reasons == () for v in ok)
    bad = gaussian_summary.check(z, [image_statistics(photo(rng)) for _ in range(3)])
    for v in bad:
        assert v.out_of_domain
        assert v.reasons[0] == "a colour image sent to a model trained on grayscale test characters"
        assert any("photo-like" in r for r in v.reasons)
    inverted = 255 - character(rng)  # white ink on black: in no way colourful, but far too dark
    (dark,) = gaussian_summary.check(z[:1], [image_statistics(inverted)])
    assert dark.out_of_domain and "much darker than the test characters this model was trained on" in dark.reasons
    (blank,) = gaussian_summary.check(z[:1], [image_statistics(np.full((16, 16, 3), 200, np.uint8))])
    assert blank.reasons == (BLANK,)


def test_check_refuses_mismatched_stats(gaussian_summary: DomainSummary) -> None:
    z = PixelEmbedder().embed(gaussian_images(3, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="2 ImageStats for 3 embeddings"):
        gaussian_summary.check(z, [image_statistics(np.zeros((4, 4, 3), np.uint8))] * 2)


def test_summarise_domain_refuses_bad_inputs() -> None:
    rng = np.random.default_rng(0)
    stats = [image_statistics(character(rng))]
    with pytest.raises(ValueError, match=r"uint8 \(N, 3, 4, 4\) for mode 'RGB'"):
        summarise_domain(PixelEmbedder(), gaussian_images(10, rng), stats, mode="RGB", size=4, rng=rng)
    with pytest.raises(ValueError, match="stats is empty"):
        summarise_domain(PixelEmbedder(), gaussian_images(10, rng), [], mode="L", size=4, rng=rng)
    with pytest.raises(ValueError, match="too few"):
        summarise_domain(PixelEmbedder(), gaussian_images(100, rng), stats, mode="L", size=4, rng=rng)


# -- serialisation ------------------------------------------------------------------------------------
def test_round_trip_through_json_gives_the_same_verdicts(gaussian_summary: DomainSummary) -> None:
    d = json.loads(json.dumps(gaussian_summary.to_dict(), sort_keys=True))  # as in manifest.json
    back = DomainSummary.from_dict(d)
    assert back.to_dict() == gaussian_summary.to_dict()
    rng = np.random.default_rng(7)
    z = PixelEmbedder().embed(gaussian_images(50, rng))
    stats = [image_statistics(photo(rng) if i % 2 else character(rng)) for i in range(50)]
    assert back.check(z, stats) == gaussian_summary.check(z, stats)
    assert (back.mode, back.channels, back.size) == ("L", 1, 4)
    assert back.description == "grayscale 4x4 test characters"


def _broken(d: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    node = d
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


@pytest.mark.parametrize(("path", "value", "message"), [
    (("mode",), "CMYK", "'CMYK'"),
    (("channels",), 3, "channels 3"),
    (("embedding", "method"), "knn-v9", "'knn-v9'"),
    (("embedding", "threshold"), -1.0, "threshold = -1.0"),
    (("embedding", "basis", "shape"), [3, 3], r"shape \[3, 3\]"),
    (("embedding", "mean"), [0.0, 1.0], "embedding mean"),
    (("image_quantiles", "sharpness"), [0, 1, 2], "sharpness"),
    (("image_quantiles", "contrast"), [0.3, 0.2, 0.1], "contrast: quantiles"),
    (("image_stats_from",), "guesses", "'guesses'"),
    (("stats_side",), 500, "stats_side 500"),
    (("size",), KeyError, "size"),
])
def test_bad_dicts_are_refused_naming_the_value(gaussian_summary: DomainSummary, path: tuple[str, ...],
                                                value: Any, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        DomainSummary.from_dict(_broken(gaussian_summary.to_dict(), path, value))


def test_summary_is_small() -> None:
    rng = np.random.default_rng(0)
    s = summarise_embeddings(rng.normal(size=(2000, 64)), rng.normal(size=(400, 64)), components=16)
    assert len(json.dumps(s.to_dict(), indent=2)) < 8000  # it lives in manifest.json


# -- the bundle -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_domain() -> DomainSummary:
    images = sample_images(1000, seed=3)
    stats = model_image_statistics(images)
    return summarise_domain(TorchEmbedder(tiny_backbone(), Preprocessing("L", 28)), images, stats, mode="L",
                            size=28, rng=np.random.default_rng(0), image_stats_from="model inputs")


def test_bundle_carries_its_domain(tmp_path: Path, tiny_domain: DomainSummary) -> None:
    bundle = load_bundle(export_tiny(tmp_path / "b", domain=tiny_domain.to_dict()))
    assert bundle.domain is not None and bundle.domain.to_dict() == tiny_domain.to_dict()
    z = bundle.onnx_embedder.embed(sample_images(4, seed=9))
    assert len(bundle.domain.check(z, model_image_statistics(sample_images(4, seed=9)))) == 4


def test_export_refuses_a_domain_of_another_model(tmp_path: Path, tiny_domain: DomainSummary) -> None:
    wrong = {**tiny_domain.to_dict(), "size": 32}
    with pytest.raises(CheckpointError, match="size 32.*'L', 28"):
        export_tiny(tmp_path / "b", domain=wrong)
    assert not (tmp_path / "b").exists()


def test_old_manifest_without_domain_still_loads(tiny_bundle_dir: Path) -> None:
    d = json.loads((tiny_bundle_dir / MANIFEST).read_text())
    d.pop("domain", None)
    assert Manifest.from_json(json.dumps(d), where="old").domain is None
    assert load_bundle(tiny_bundle_dir).domain is None


# -- real data ------------------------------------------------------------------------------------------
def _require_or_skip(reason: str) -> None:
    """tests/conftest.py's require_or_skip (loaded by path: `import conftest` is ambiguous here)."""
    spec = importlib.util.spec_from_file_location("fewshot_tests_root_conftest", Path(__file__).parents[1] / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.require_or_skip(reason)


def _zip_sample(path: Path, suffix: str, n: int, rng: np.random.Generator) -> list[bytes]:
    with zipfile.ZipFile(path) as z:
        names = sorted(m for m in z.namelist() if m.endswith(suffix))
        return [z.read(names[i]) for i in rng.choice(len(names), n, replace=False)]


def _decode(blobs: list[bytes]) -> tuple[np.ndarray, list[ImageStats]]:
    pre = Preprocessing("L", 28)
    return np.stack([decode_image(b, pre) for b in blobs]), [upload_statistics(b) for b in blobs]


@pytest.mark.integration
def test_real_photos_are_flagged_and_characters_are_not(data_root: Path) -> None:
    """Background alphabets (train) summarise the domain of a tiny Conv-4; evaluation alphabets
    are new characters (few flags), CIFAR-10 photos must be flagged."""
    cifar = data_root / "cifar10-subset" / "cifar10_subset.zip"
    if not cifar.is_file():
        _require_or_skip(f"CIFAR-10 subset not found at {cifar}")
    rng = np.random.default_rng(0)
    omni = data_root / "omniglot"
    train_x, train_stats = _decode(_zip_sample(omni / "images_background.zip", ".png", 1500, rng))
    embedder = TorchEmbedder(tiny_backbone(), Preprocessing("L", 28))
    summary = summarise_domain(embedder, train_x, train_stats, mode="L", size=28, rng=rng,
                               trained_on="Omniglot characters")
    test_x, test_stats = _decode(_zip_sample(omni / "images_evaluation.zip", ".png", 400, rng))
    photo_x, photo_stats = _decode(_zip_sample(cifar, ".jpg", 400, rng))
    false_alarms = np.mean([v.out_of_domain for v in summary.check(embedder.embed(test_x), test_stats)])
    caught = [v for v in summary.check(embedder.embed(photo_x), photo_stats) if v.out_of_domain]
    assert false_alarms < 0.04
    assert len(caught) / 400 > 0.97
    assert sum("colour image" in v.reasons[0] for v in caught) > 200
