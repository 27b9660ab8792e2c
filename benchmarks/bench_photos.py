"""Photos: EfficientNet-Lite with ImageNet-1k weights as a frozen few-shot embedder on real photos.

Sections "bundles" and "latency" (the default): the photos bundles of `--variants` (Lite0, the
fast one, and Lite2, the default) side by side, each built by `build_photos_bundle` as shipped
and measured as served (its ONNX model + its decision, `fewshot.decision.episode`):
* accuracy on fixed-seed episodes (`episode_rng(seed, i)`, 15 queries, mean and 95% CI): CIFAR-10
  subset test photos 5-way 5-shot (100 per class, 32x32 upscaled to 224), miniImageNet *test*
  classes 5-way 1-shot and 5-shot (`--mini-per-class` per class; ImageNet-1k, which trained the
  weights, covers those classes: not a few-shot result);
* the same with the int8 model (`quantise_bundle`, per-channel, calibrated on 10 x
  `--calibration-per-class` CIFAR-10 train images, forced: the drop is recorded);
* the domain check (summary fitted on miniImageNet *training* classes): the share of held-out
  photos (miniImageNet test classes, CIFAR-10 test) flagged, and of characters, noise and blanks;
* per-image latency, fp32 and int8, batch 1 and 8, ONNX Runtime with 2 intra-op threads, all
  models alternating (section "latency"; reads the bundles of `--bundles-dir`).

    python benchmarks/bench_photos.py --data ../shared/datasets --episodes 600 --bundles-dir /tmp/photos-bundles

Lite0 studies (`--sections check,variants,served,lite0-latency`):
1. Preprocessing check: does the ImageNet top-5 of 200 CIFAR-10 test images (20 per class, 32x32
   upscaled to 224) contain a plausible ImageNet class (`fewshot.artifacts.photos.PLAUSIBLE_IMAGENET`)? For
   the backbone's TensorFlow arithmetic (TF "same" padding, batch-norm eps 1e-3, (255 x - 127) / 128
   inside the model) under lanczos / bilinear (imageio's filters) and bicubic (Pillow directly:
   not in imageio), and for symmetric padding, ImageNet mean/std input and eps 1e-5.
2. 5-way 5-shot nearest prototypes on the 1280-d features of the 1000 CIFAR-10 test images (100 per
   class), per resampling filter: euclidean / cosine on raw, L2-normalised, centred (minus the
   episode's support mean), centred + L2 and square-rooted features, plus the logistic probe; and,
   for bilinear, the average of the image's and its mirror image's features ("flip"); 600
   fixed-seed episodes (`episode_rng(seed, i)`) with 15 queries per class, mean and 95% CI; the
   same episodes with symmetric padding (bilinear) for a paired comparison of the padding.
3. The Lite0 bundle as served on the same episodes.
4. CPU latency of the exported ONNX embedder: ONNX Runtime, batch 1, 2 intra-op threads.

All embeddings come from ONNX Runtime (PyTorch eager is ~10x slower for depthwise convolutions
on CPU); export_bundle guarantees the two agree within 1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESAMPLES = ("lanczos", "bilinear", "bicubic")
VARIANTS: dict[str, dict[str, Any]] = {  # backbone arguments of the preprocessing check
    "tf_same, eps 1e-3, (x-127)/128": {},
    "symmetric padding": {"padding": "symmetric"},
    "ImageNet mean/std": {"input_mean": [123.675, 116.28, 103.53], "input_std": [58.395, 57.12, 57.375]},
    "bn eps 1e-5": {"bn_eps": 1e-5},
}


class Logits(nn.Module):
    """Backbone -> (N, 1000) ImageNet logits, to export the classifier like an embedder."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.logits(x)  # type: ignore[operator]


def ort_embedder(module: nn.Module, out_dim: int, tmp: Path, name: str) -> Any:
    from fewshot.artifacts.embedders import OnnxEmbedder
    from fewshot.artifacts.onnx_export import export_onnx
    from fewshot.data.imageio import Preprocessing

    path = export_onnx(module.eval(), tmp / f"{name}.onnx", channels=3, size=224)
    return OnnxEmbedder(path, Preprocessing("RGB", 224), embedding_dim=out_dim, intra_op_threads=2)


def embed(embedder: Any, images: np.ndarray, batch: int = 4) -> np.ndarray:
    return np.concatenate([embedder.embed(images[i:i + batch]) for i in range(0, len(images), batch)])


def load_test(zip_path: Path, per_class: int, resample: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """-> uint8 (10 * per_class, 3, 224, 224), labels (N,), class names; decoded as the service does."""
    from fewshot.artifacts.photos import cifar10_images
    from fewshot.data.imageio import Preprocessing

    by_class = cifar10_images(zip_path, "test", per_class, Preprocessing("RGB", 224, resample))
    classes = list(by_class)
    return np.concatenate(list(by_class.values())), np.repeat(np.arange(len(classes)), per_class), classes


def preprocessing_check(zip_path: Path, per_class: int, tmp: Path) -> list[dict[str, Any]]:
    from fewshot.artifacts.photos import PLAUSIBLE_IMAGENET, plausible_top5
    from fewshot.backbones import create_backbone

    rows = []
    data = {r: load_test(zip_path, per_class, r) for r in RESAMPLES}
    for variant, kwargs in VARIANTS.items():
        net = create_backbone("efficientnet_lite0", in_channels=3, image_size=224, pretrained=True, **kwargs)
        runner = ort_embedder(Logits(net), 1000, tmp, "logits")
        for r in RESAMPLES:
            images, labels, classes = data[r]
            logits = embed(runner, images)
            names = [classes[i] for i in labels]
            ok = plausible_top5(logits, names)
            top1 = np.array([int(row.argmax()) in PLAUSIBLE_IMAGENET[c] for row, c in zip(logits, names)])
            prob = torch.softmax(torch.from_numpy(logits), 1).numpy()
            mass = np.array([prob[i, sorted(PLAUSIBLE_IMAGENET[c])].sum() for i, c in enumerate(names)])
            rows.append({"variant": variant, "resample": r, "images": len(images), "plausible_top5": int(ok.sum()),
                         "plausible_top1": int(top1.sum()), "plausible_probability": round(float(mass.mean()), 4),
                         "per_class_top5": {c: int(ok[labels == i].sum()) for i, c in enumerate(classes)}})
            print(f"  {variant:32s} {r:9s} top-5 plausible {ok.sum():3d}/{len(ok)}  top-1 {top1.sum():3d}  "
                  f"mean probability on plausible classes {mass.mean():.3f}")
    return rows


PREPROCESSINGS = {  # the decode variants of the study (all 224x224, decoded by fewshot.data.imageio)
    "bilinear": {"resample": "bilinear"},
    "bilinear, crop 0.875": {"resample": "bilinear", "crop": 0.875},
    "bicubic": {"resample": "bicubic"},
}


def feature_maps(centre_raw: np.ndarray, centre_sqrt: np.ndarray) -> dict[str, Any]:
    """Per-vector feature maps: raw; L2; power 0.5 (Yang et al. 2021); CL2N = minus the mean feature
    of CIFAR-10 *train* images, then L2 (SimpleShot, Wang et al. 2019); power 0.5 then CL2N."""
    def l2(z: np.ndarray) -> np.ndarray:
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

    return {"raw": lambda z: z, "l2": l2, "sqrt": lambda z: np.sqrt(np.maximum(z, 0)),
            "cl2n": lambda z: l2(z - centre_raw), "sqrt+cl2n": lambda z: l2(np.sqrt(np.maximum(z, 0)) - centre_sqrt)}


def episode_rows(labels: np.ndarray, *, episodes: int, seed: int, way: int = 5, shot: int = 5,
                 query: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-seed episodes over all classes in `labels` (`episode_rng(seed, i)`): support rows
    (E, way * shot) and query rows (E, way * query), class by class."""
    from fewshot.episodes.sampling import episode_rng

    by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
    s_rows, q_rows = [], []
    for i in range(episodes):
        rng = episode_rng(seed, i)
        rows = [rng.permutation(by_class[c])[:shot + query] for c in rng.choice(len(by_class), size=way, replace=False)]
        s_rows.append(np.concatenate([r[:shot] for r in rows]))
        q_rows.append(np.concatenate([r[shot:] for r in rows]))
    return np.stack(s_rows), np.stack(q_rows)


def episodes_accuracy(z: np.ndarray, labels: np.ndarray, rule: Any, *, episodes: int, seed: int, way: int = 5,
                      shot: int = 5, query: int = 15) -> dict[str, float]:
    """Mean / 95% CI (%) of `rule` (a DecisionRule, applied episode by episode as the service does)."""
    from fewshot.decision import episode
    from fewshot.training.evaluate import mean_ci95

    zt = np.ascontiguousarray(z, dtype=np.float32)
    ys, yq = np.repeat(np.arange(way), shot), np.repeat(np.arange(way), query)
    s_rows, q_rows = episode_rows(labels, episodes=episodes, seed=seed, way=way, shot=shot, query=query)
    acc = [float((episode(rule, zt[s], ys, way, zt[q]).label == yq).mean()) for s, q in zip(s_rows, q_rows)]
    mean, ci = mean_ci95(np.array(acc))
    return {"mean": round(100 * mean, 2), "ci95": round(100 * ci, 2)}


def prototype_accuracy(z: np.ndarray, labels: np.ndarray, metric: str, *, episodes: int, seed: int, way: int = 5,
                       shot: int = 5, query: int = 15) -> dict[str, float]:
    """`episodes_accuracy` of nearest prototypes (`decision.prototype_logits`' argmax: squared
    Euclidean distance or cosine to the class means), all episodes in one batched computation."""
    from fewshot.training.evaluate import mean_ci95

    s_rows, q_rows = episode_rows(labels, episodes=episodes, seed=seed, way=way, shot=shot, query=query)
    protos = z[s_rows].reshape(episodes, way, shot, -1).mean(2)  # (E, way, D)
    zq = z[q_rows]  # (E, way * query, D)
    if metric == "cosine":
        protos = protos / np.linalg.norm(protos, axis=-1, keepdims=True).clip(1e-12)
        score = zq @ protos.transpose(0, 2, 1)
    else:
        score = 2 * zq @ protos.transpose(0, 2, 1) - (protos**2).sum(-1)[:, None, :]  # -|q - p|^2 + |q|^2
    acc = (score.argmax(-1) == np.repeat(np.arange(way), query)[None]).mean(1)
    mean, ci = mean_ci95(acc)
    return {"mean": round(100 * mean, 2), "ci95": round(100 * ci, 2)}


def split_images(zip_path: Path, split: str, per_class: int, pre: Any) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (10 * per_class, 3, 224, 224) decoded as the service does, and class labels (N,)."""
    from fewshot.artifacts.photos import cifar10_images

    by_class = cifar10_images(zip_path, split, per_class, pre)
    return np.concatenate(list(by_class.values())), np.repeat(np.arange(len(by_class)), per_class)


def variant_study(zip_path: Path, runner: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Decode variant x feature map x metric on 5w5s episodes. The feature centre is the mean of the
    first `--centre-per-class` train images per class; variants are *chosen* on episodes of the next
    `--select-per-class` train images (never test), and every variant is also reported on test."""
    from fewshot.data.imageio import Preprocessing

    rows = []
    n_c, n_s = args.centre_per_class, args.select_per_class
    for name, kw in PREPROCESSINGS.items():
        pre = Preprocessing("RGB", 224, **kw)
        train, train_y = split_images(zip_path, "train", n_c + n_s, pre)
        z_train = embed(runner, train)
        centre_mask = np.tile(np.arange(n_c + n_s) < n_c, 10)
        test, test_y = split_images(zip_path, "test", args.fewshot_per_class, pre)
        z_test = embed(runner, test)
        zc = z_train[centre_mask]
        maps = feature_maps(zc.mean(0), np.sqrt(np.maximum(zc, 0)).mean(0))
        for fname, fmap in maps.items():
            for metric in ("euclidean", "cosine"):
                sel = prototype_accuracy(fmap(z_train[~centre_mask]), train_y[~centre_mask], metric,
                                         episodes=args.episodes, seed=args.seed + 1)
                test_acc = prototype_accuracy(fmap(z_test), test_y, metric, episodes=args.episodes, seed=args.seed)
                rows.append({"decode": name, "features": fname, "metric": metric, "train_selection": sel, "test": test_acc})
                print(f"  {name:22s} {fname:10s} {metric:9s}  train {sel['mean']:6.2f} +-{sel['ci95']:4.2f}   "
                      f"test {test_acc['mean']:6.2f} +-{test_acc['ci95']:4.2f}", flush=True)
    return rows


def served(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The Lite0 photos bundle built by `build_photos_bundle` (no open-set calibration: it does not change
    accuracy), loaded with `load_bundle`, on test photos decoded under its manifest's preprocessing,
    embedded by its ONNX model and classified by its decision rule: the service's path."""
    from fewshot.artifacts.bundle import load_bundle
    from fewshot.artifacts.photos import build_photos_bundle

    bundle = load_bundle(build_photos_bundle(tmp / "photos", variant="efficientnet_lite0", data_root=args.data,
                                             calibration_per_class=0, domain_per_class=0))
    images, labels = split_images(args.data / "cifar10-subset" / "cifar10_subset.zip", "test",
                                  args.fewshot_per_class, bundle.preprocessing)
    z = embed(bundle.onnx_embedder, images)
    acc = episodes_accuracy(z, labels, bundle.decision_rule, episodes=args.episodes, seed=args.seed)
    return {**acc, "preprocessing": bundle.preprocessing.to_dict(), "rule": bundle.decision_rule.to_dict(),
            "backbone": bundle.manifest.backbone}


def latency(tmp: Path, images: np.ndarray, runs: int) -> dict[str, float]:
    from fewshot.backbones import create_backbone

    net = create_backbone("efficientnet_lite0", in_channels=3, image_size=224, num_classes=0, pretrained=True)
    e = ort_embedder(net, 1280, tmp, "features")
    for i in range(10):
        e.embed(images[i:i + 1])
    ms = []
    for i in range(runs):
        x = images[i % len(images)][None]
        t = time.perf_counter()
        e.embed(x)
        ms.append(1e3 * (time.perf_counter() - t))
    a = np.array(ms)
    return {"runs": runs, "median_ms": round(float(np.median(a)), 2), "p90_ms": round(float(np.quantile(a, 0.9)), 2),
            "mean_ms": round(float(a.mean()), 2), "min_ms": round(float(a.min()), 2),
            "onnx_mb": round((tmp / "features.onnx").stat().st_size / 2**20, 2), "threads": 2, "batch": 1}


# -- the shipped photos bundles side by side (section "bundles", then "latency") ---------------------
def mini_test(args: argparse.Namespace, pre: Any) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """miniImageNet test classes: uint8 (20 * n, 3, 224, 224), labels, the JPEG bytes (for stats)."""
    from fewshot.artifacts.photos import miniimagenet_files
    from fewshot.data.imageio import decode_image

    files = miniimagenet_files(args.data, "test", args.mini_per_class)
    if files is None:
        sys.exit(f"miniImageNet not found under {args.data}; it holds the miniImageNet rows and the domain check")
    blobs = [(n, b) for fs in files.values() for n, b in fs]
    images = np.stack([decode_image(b, pre, name=n) for n, b in blobs])
    return images, np.repeat(np.arange(len(files)), args.mini_per_class), [b for _, b in blobs]


def cifar_test_bytes(zip_path: Path, per_class: int) -> list[bytes]:
    """The CIFAR-10 test JPEGs in `cifar10_images`' order (class by class, first `per_class`)."""
    import zipfile

    with zipfile.ZipFile(zip_path) as z:
        by_class: dict[str, list[str]] = {}
        for n in sorted(n for n in z.namelist() if "/test/" in n and n.endswith(".jpg")):
            by_class.setdefault(n.split("/")[-2], []).append(n)
        return [z.read(n) for c in sorted(by_class) for n in by_class[c][:per_class]]


def not_photos(data_root: Path, n: int, rng: np.random.Generator) -> dict[str, list[bytes]]:
    """Uploads that are not photos: Omniglot characters (105x105 PNGs of images_evaluation.zip, a
    seeded choice), colour and gray noise, blank images; as file bytes, the way users send them."""
    import io
    import zipfile

    from PIL import Image

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    with zipfile.ZipFile(data_root / "omniglot" / "images_evaluation.zip") as z:
        names = sorted(m for m in z.namelist() if m.endswith(".png"))
        chars = [z.read(names[i]) for i in sorted(rng.choice(len(names), n, replace=False))]
    return {"Omniglot characters": chars,
            "colour noise": [png(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(n)],
            "gray noise": [png(rng.integers(0, 256, (224, 224), dtype=np.uint8)) for _ in range(n)],
            "blank (white, black, grey)": [png(np.full((224, 224, 3), v, np.uint8)) for v in (255, 0, 128)]}


def domain_rates(domain: Any, z: np.ndarray, blobs: list[bytes]) -> dict[str, Any]:
    """Share of images the bundle's domain summary flags (image statistics + embedding score)."""
    from fewshot.artifacts.domain import upload_statistics

    stats = [upload_statistics(b) for b in blobs]
    both, emb = domain.check(z, stats), domain.check(z, None)
    return {"n": len(z), "flagged": round(float(np.mean([v.out_of_domain for v in both])), 4),
            "embedding_only": round(float(np.mean([v.out_of_domain for v in emb])), 4),
            "image_stats_only": round(float(np.mean([bool(domain.image_reasons(s)) for s in stats])), 4)}


def served_rows(z_cifar: np.ndarray, y_cifar: np.ndarray, z_mini: np.ndarray, y_mini: np.ndarray, rule: Any,
                args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Accuracy as served (bundle's decision on its embeddings), fixed-seed episodes, 15 queries."""
    kw = {"episodes": args.episodes, "seed": args.seed}
    return {"cifar10_5w5s": episodes_accuracy(z_cifar, y_cifar, rule, shot=5, **kw),
            "miniimagenet_test_5w1s": episodes_accuracy(z_mini, y_mini, rule, shot=1, **kw),
            "miniimagenet_test_5w5s": episodes_accuracy(z_mini, y_mini, rule, shot=5, **kw)}


def bundle_row(variant: str, args: argparse.Namespace, bundles: Path) -> dict[str, Any]:
    """Build `variant`'s photos bundle as shipped (domain summary included; no open-set calibration:
    it does not change accuracy), measure it as served, quantise it (int8, forced: the drop is
    recorded, not refused) and measure the int8 model on the same episodes and the domain check."""
    from fewshot.artifacts.bundle import load_bundle
    from fewshot.artifacts.photos import build_photos_bundle, cifar10_images
    from fewshot.artifacts.quantise import QuantiseConfig, calibration_sample, quantise_bundle
    from fewshot.backbones import create_backbone
    from fewshot.data.imageio import decode_image

    zip_path = args.data / "cifar10-subset" / "cifar10_subset.zip"
    t = time.perf_counter()
    fp32_dir, build_s = bundles / variant, None
    if not (fp32_dir / "manifest.json").is_file():  # a bundle kept in --bundles-dir by an earlier run is reused
        build_photos_bundle(fp32_dir, variant=variant, data_root=args.data, calibration_per_class=0)
        build_s = round(time.perf_counter() - t, 1)
    bundle = load_bundle(fp32_dir)
    pre, rule = bundle.preprocessing, bundle.decision_rule
    x_cifar, y_cifar = split_images(zip_path, "test", args.fewshot_per_class, pre)
    x_mini, y_mini, mini_bytes = mini_test(args, pre)
    t = time.perf_counter()
    z = {"cifar": embed(bundle.onnx_embedder, x_cifar, 8), "mini": embed(bundle.onnx_embedder, x_mini, 8)}
    embed_s = time.perf_counter() - t
    print(f"  {variant}: bundle built in {build_s} s; {len(x_cifar) + len(x_mini)} photos embedded in "
          f"{embed_s:.0f} s", flush=True)
    fp32 = served_rows(z["cifar"], y_cifar, z["mini"], y_mini, rule, args)
    int8_z: dict[str, np.ndarray] = {}

    def evaluate(embedder: Any) -> dict[str, float]:
        probe = embedder.embed(x_cifar[:1])
        is_fp32 = bool(np.allclose(probe, z["cifar"][:1], atol=1e-5))  # the bundle's own fp32 model
        zz = z if is_fp32 else {"cifar": embed(embedder, x_cifar, 8), "mini": embed(embedder, x_mini, 8)}
        if not is_fp32:
            int8_z.update(zz)
        rows = served_rows(zz["cifar"], y_cifar, zz["mini"], y_mini, rule, args)
        return {k: v["mean"] / 100 for k, v in rows.items()}

    train = cifar10_images(zip_path, "train", 3 * args.calibration_per_class, pre)
    calibration = calibration_sample(train, 10 * args.calibration_per_class, np.random.default_rng(args.seed))
    t = time.perf_counter()
    int8_dir, quantise_s = bundles / f"{variant}-int8", None
    if (int8_dir / "manifest.json").is_file():
        evaluate(load_bundle(int8_dir).onnx_embedder)
    else:
        quantise_bundle(fp32_dir, calibration, evaluate, out_dir=int8_dir, force=True,
                        config=QuantiseConfig(per_channel=True))
        quantise_s = round(time.perf_counter() - t, 1)
    int8 = served_rows(int8_z["cifar"], y_cifar, int8_z["mini"], y_mini, rule, args)
    domain = bundle.domain
    assert domain is not None, "the photos bundle has no domain summary: is miniImageNet under --data?"
    rng = np.random.default_rng(args.seed)
    foreign = not_photos(args.data, args.foreign, rng)

    held = {"miniImageNet test photos (held-out classes)": (z["mini"], mini_bytes, int8_z["mini"]),
            "CIFAR-10 test photos (32x32)": (z["cifar"], cifar_test_bytes(zip_path, args.fewshot_per_class),
                                             int8_z["cifar"])}
    rates: dict[str, Any] = {}
    for name, (zz, blobs, zi) in held.items():
        rates[name] = {**domain_rates(domain, zz, blobs), "int8_flagged": domain_rates(domain, zi, blobs)["flagged"]}
    for name, blobs in foreign.items():
        x = np.stack([decode_image(b, pre) for b in blobs])
        rates[name] = domain_rates(domain, embed(bundle.onnx_embedder, x, 8), blobs)
    for name, r in rates.items():
        print(f"    domain: {name:45s} flagged {100 * r['flagged']:5.1f}% of {r['n']} (embedding "
              f"{100 * r['embedding_only']:5.1f}%, image statistics {100 * r['image_stats_only']:5.1f}%)", flush=True)
    return {"variant": variant, "build_s": build_s, "quantise_and_measure_s": quantise_s,
            "fp32": fp32, "int8": int8, "domain": rates,
            "domain_summary": {"trained_on": domain.trained_on, "n_fit": domain.embedding.n_fit,
                               "n_held_out": domain.embedding.n_held_out, "source": bundle.manifest.source.get("domain_from")},
            "onnx_mb": {"fp32": round((int8_dir / "model.onnx").stat().st_size / 2**20, 2),
                        "int8": round((int8_dir / "model.int8.onnx").stat().st_size / 2**20, 2)},
            "params_without_head": sum(p.numel() for p in create_backbone(
                variant, in_channels=3, image_size=32, num_classes=0).parameters())}


def latency_rows(bundles: Path, variants: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Per-image ms of each variant's fp32 and int8 model (its `-int8` bundle holds both), ONNX
    Runtime with 2 intra-op threads, at batch 1 and 8; all models alternate call by call in
    `--rounds` rounds so background load hits them alike."""
    from fewshot.artifacts.bundle import INT8_ONNX, ONNX, Manifest
    from fewshot.artifacts.embedders import OnnxEmbedder
    from fewshot.data.imageio import Preprocessing

    models = {}
    for v in variants:
        d = bundles / f"{v}-int8"
        if not (d / INT8_ONNX).is_file():
            sys.exit(f"{d} has no int8 model; run --sections bundles with --bundles-dir {bundles} first")
        m = Manifest.read(d)
        pre = Preprocessing.from_dict(m.preprocessing)
        for kind, f in (("fp32", ONNX), ("int8", INT8_ONNX)):
            models[(v, kind)] = OnnxEmbedder(d / f, pre, embedding_dim=m.embedding_dim, intra_op_threads=2)
    x = load_test(args.data / "cifar10-subset" / "cifar10_subset.zip", 1, "bilinear")[0][:8]
    out: dict[str, Any] = {}
    for batch in (1, 8):
        times: dict[tuple[str, str], list[float]] = {k: [] for k in models}
        for e in models.values():
            for _ in range(3):
                e.embed(x[:batch])
        for _ in range(args.rounds):
            for k, e in models.items():
                for _ in range(args.calls):
                    t = time.perf_counter()
                    e.embed(x[:batch])
                    times[k].append(1000 * (time.perf_counter() - t) / batch)
        for (v, kind), ms in times.items():
            out.setdefault(v, {}).setdefault(kind, {})[f"batch{batch}"] = {
                "median_ms_per_image": round(float(np.median(ms)), 2), "p90_ms_per_image": round(float(np.percentile(ms, 90)), 2),
                "calls": len(ms)}
            print(f"  {v:20s} {kind} batch {batch}: {np.median(ms):7.2f} ms/image (p90 {np.percentile(ms, 90):.2f})",
                  flush=True)
    return out


def bundles_table(rows: dict[str, Any], lat: dict[str, Any] | None) -> None:
    def acc(a: dict[str, float]) -> str:
        return f"{a['mean']:.2f} +- {a['ci95']:.2f}"

    print("\n| model | weights | CIFAR-10 5w5s | miniImageNet test 5w1s* | miniImageNet test 5w5s* | "
          "ms/image batch 1 | ms/image batch 8 | held-out photos flagged |")
    print("|---|---|---|---|---|---|---|---|")
    for v, r in rows.items():
        for kind in ("fp32", "int8"):
            a = r[kind]
            la = (lat or {}).get(v, {}).get(kind, {})
            ms = [f"{la[b]['median_ms_per_image']:.2f}" if b in la else "-" for b in ("batch1", "batch8")]
            flag = r["domain"]["miniImageNet test photos (held-out classes)"]["flagged" if kind == "fp32" else "int8_flagged"]
            print(f"| {v} | {kind} | {acc(a['cifar10_5w5s'])} | {acc(a['miniimagenet_test_5w1s'])} | "
                  f"{acc(a['miniimagenet_test_5w5s'])} | {ms[0]} | {ms[1]} | {100 * flag:.1f}% |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("FEWSHOT_DATA", ROOT.parent / "shared/datasets")))
    p.add_argument("--check-per-class", type=int, default=20, help="test images per class for the ImageNet check")
    p.add_argument("--fewshot-per-class", type=int, default=100, help="test images per class for episodes")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-runs", type=int, default=100)
    p.add_argument("--centre-per-class", type=int, default=30, help="train images per class for the feature centre")
    p.add_argument("--select-per-class", type=int, default=50, help="train images per class to choose variants on")
    p.add_argument("--sections", default="bundles,latency",
                   help="bundles,latency (Lite0 and Lite2 photos bundles side by side); check,variants,served,"
                        "lite0-latency (the Lite0 studies)")
    p.add_argument("--variants", default="efficientnet_lite0,efficientnet_lite2")
    p.add_argument("--mini-per-class", type=int, default=20, help="miniImageNet test photos per class (20 classes)")
    p.add_argument("--calibration-per-class", type=int, default=20, help="int8: 10x this many CIFAR-10 train images")
    p.add_argument("--foreign", type=int, default=100, help="characters and noise images each, for the domain check")
    p.add_argument("--rounds", type=int, default=10, help="latency: rounds of all models in turn")
    p.add_argument("--calls", type=int, default=5, help="latency: calls per model per round")
    p.add_argument("--bundles-dir", type=Path, default=None,
                   help="keep the built bundles here (the latency section reads them; default: a temporary folder)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/photos.json")
    args = p.parse_args()
    zip_path = args.data / "cifar10-subset" / "cifar10_subset.zip"
    if not zip_path.is_file():
        sys.exit(f"{zip_path} not found; pass --data DIR holding cifar10-subset/cifar10_subset.zip")
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    sections = set(args.sections.split(","))
    out: dict[str, Any] = {}
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bundles = args.bundles_dir or tmp / "bundles"
        bundles.mkdir(parents=True, exist_ok=True)
        if "bundles" in sections:
            print(f"Photos bundles as served, {args.episodes} fixed-seed episodes (15 queries), fp32 and int8")
            out["bundles"] = {v: bundle_row(v, args, bundles) for v in variants}
        if "latency" in sections:
            print(f"\nPer-image latency, ONNX Runtime, 2 intra-op threads, {args.rounds} rounds x {args.calls} calls")
            out["latency"] = latency_rows(bundles, variants, args)
        if "bundles" in out:
            bundles_table(out["bundles"], out.get("latency"))
        if "check" in sections:
            print(f"1. ImageNet top-5 in a plausible class, {10 * args.check_per_class} CIFAR-10 test images")
            out["preprocessing_check"] = preprocessing_check(zip_path, args.check_per_class, tmp)
        from fewshot.backbones import create_backbone

        if "variants" in sections:
            net = create_backbone("efficientnet_lite0", in_channels=3, image_size=224, num_classes=0, pretrained=True)
            runner = ort_embedder(net, 1280, tmp, "features")
            print(f"\n2. 5-way 5-shot nearest prototypes, {args.episodes} episodes, accuracy % +- 95% CI: chosen on "
                  f"train images ({args.select_per_class}/class), reported on test ({args.fewshot_per_class}/class)")
            out["variants_5w5s"] = variant_study(zip_path, runner, args)
        if "served" in sections:
            print(f"\n3. The photos bundle as served (ONNX Runtime + the bundle's rule), {args.episodes} test episodes")
            out["served_5w5s"] = served(args, tmp)
            print(f"  {out['served_5w5s']}")
        if "lite0-latency" in sections:
            print(f"\n4. ONNX Runtime latency, batch 1, 2 threads ({args.latency_runs} runs)")
            lat = latency(tmp, load_test(zip_path, 2, "bilinear")[0], args.latency_runs)
            print(f"  median {lat['median_ms']} ms, p90 {lat['p90_ms']} ms, min {lat['min_ms']} ms; "
                  f"model.onnx {lat['onnx_mb']} MiB")
            out["latency"] = lat
    import onnxruntime

    out = {"meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
                    "platform": platform.platform(), "cpus": os.cpu_count(),
                    "command": " ".join(["python", *sys.argv]), "seed": args.seed, "episodes": args.episodes},
           **out, "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\nraw: {args.out} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
