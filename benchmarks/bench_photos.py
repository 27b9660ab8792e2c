"""Photos: EfficientNet-Lite0 with ImageNet-1k weights as a frozen few-shot embedder on real photos.

1. Preprocessing check: does the ImageNet top-5 of 200 CIFAR-10 test images (20 per class, 32x32
   upscaled to 224) contain a plausible ImageNet class (`fewshot.photos.PLAUSIBLE_IMAGENET`)? For
   the backbone's TensorFlow arithmetic (TF "same" padding, batch-norm eps 1e-3, (255 x - 127) / 128
   inside the model) under lanczos / bilinear (imageio's filters) and bicubic (Pillow directly:
   not in imageio), and for symmetric padding, ImageNet mean/std input and eps 1e-5.
2. 5-way 5-shot nearest prototypes on the 1280-d features of the 1000 CIFAR-10 test images (100 per
   class), per resampling filter: euclidean / cosine on raw, L2-normalised, centred (minus the
   episode's support mean), centred + L2 and square-rooted features, plus the logistic probe; and,
   for bilinear, the average of the image's and its mirror image's features ("flip"); 600
   fixed-seed episodes (`episode_rng(seed, i)`) with 15 queries per class, mean and 95% CI; the
   same episodes with symmetric padding (bilinear) for a paired comparison of the padding.
3. CPU latency of the exported ONNX embedder: ONNX Runtime, batch 1, 2 intra-op threads.

All embeddings come from ONNX Runtime (PyTorch eager is ~10x slower for depthwise convolutions
on CPU); export_bundle guarantees the two agree within 1e-4.

    python benchmarks/bench_photos.py --data ../shared/datasets [--episodes 600]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESAMPLES = ("lanczos", "bilinear", "bicubic")  # bicubic is not in imageio._RESAMPLE: decoded here
VARIANTS: dict[str, dict[str, Any]] = {  # backbone arguments of the preprocessing check
    "tf_same, eps 1e-3, (x-127)/128": {},
    "symmetric padding": {"padding": "symmetric"},
    "ImageNet mean/std": {"input_mean": [123.675, 116.28, 103.53], "input_std": [58.395, 57.12, 57.375]},
    "bn eps 1e-5": {"bn_eps": 1e-5},
}
FEATURES = ("raw", "l2", "centred", "centred+l2", "sqrt")


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
    """-> uint8 (10 * per_class, 3, 224, 224), labels (N,), class names; decoded as the service does
    (fewshot.data.imageio) or, for bicubic, with Pillow: RGB, then one resize to 224x224."""
    from fewshot.data.imageio import Preprocessing, decode_image

    with zipfile.ZipFile(zip_path) as z:
        names = sorted(n for n in z.namelist() if "/test/" in n and n.endswith(".jpg"))
        classes = sorted({n.split("/")[-2] for n in names})
        picked = [n for c in classes for n in [m for m in names if m.split("/")[-2] == c][:per_class]]
        if resample == "bicubic":
            def decode(data: bytes) -> np.ndarray:
                img = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
                return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        else:
            pre = Preprocessing("RGB", 224, resample)

            def decode(data: bytes) -> np.ndarray:
                return decode_image(data, pre)
        images = np.stack([decode(z.read(n)) for n in picked])
    labels = np.repeat(np.arange(len(classes)), per_class)
    return images, labels, classes


def preprocessing_check(zip_path: Path, per_class: int, tmp: Path) -> list[dict[str, Any]]:
    from fewshot.backbones import create_backbone
    from fewshot.photos import PLAUSIBLE_IMAGENET, plausible_top5

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


def transform(zs: torch.Tensor, zq: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "sqrt":  # power transform beta = 0.5 of the non-negative features (Yang et al. 2021)
        return zs.clamp_min(0).sqrt(), zq.clamp_min(0).sqrt()
    if kind.startswith("centred"):
        centre = zs.mean(0, keepdim=True)  # the support set only: inductive, what a service could do
        zs, zq = zs - centre, zq - centre
    if kind.endswith("l2"):
        zs, zq = nn.functional.normalize(zs, dim=-1), nn.functional.normalize(zq, dim=-1)
    return zs, zq


def few_shot(z: np.ndarray, labels: np.ndarray, *, episodes: int, seed: int, way: int = 5, shot: int = 5,
             query: int = 15) -> dict[str, dict[str, float]]:
    """Accuracy mean / 95% CI per (features, rule) over fixed-seed episodes of all the classes."""
    from fewshot.decision import DecisionRule
    from fewshot.episodes.sampling import episode_rng
    from fewshot.training.evaluate import mean_ci95

    zt = torch.from_numpy(z)
    by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
    rules = {f"{f} {m}": (f, DecisionRule("prototype", m)) for f in FEATURES for m in ("euclidean", "cosine")}
    rules["raw probe"] = ("raw", DecisionRule("probe"))
    acc: dict[str, list[float]] = {k: [] for k in rules}
    ys = torch.arange(way).repeat_interleave(shot)
    yq = torch.arange(way).repeat_interleave(query)
    for i in range(episodes):
        rng = episode_rng(seed, i)
        picked = rng.choice(len(by_class), size=way, replace=False)
        rows = [rng.permutation(by_class[c])[:shot + query] for c in picked]
        zs = zt[np.concatenate([r[:shot] for r in rows])]
        zq = zt[np.concatenate([r[shot:] for r in rows])]
        for key, (feat, rule) in rules.items():
            s, q = transform(zs, zq, feat)
            pred = rule.episode_logits(s, ys, way, q).argmax(1)
            acc[key].append(float((pred == yq).float().mean()))
    out = {}
    for key, a in acc.items():
        mean, ci = mean_ci95(np.array(a))
        out[key] = {"mean": round(100 * mean, 2), "ci95": round(100 * ci, 2)}
    return out


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("FEWSHOT_DATA", ROOT.parent / "shared/datasets")))
    p.add_argument("--check-per-class", type=int, default=20, help="test images per class for the ImageNet check")
    p.add_argument("--fewshot-per-class", type=int, default=100, help="test images per class for episodes")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-runs", type=int, default=100)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/photos.json")
    args = p.parse_args()
    zip_path = args.data / "cifar10-subset" / "cifar10_subset.zip"
    if not zip_path.is_file():
        sys.exit(f"{zip_path} not found; pass --data DIR holding cifar10-subset/cifar10_subset.zip")
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"1. ImageNet top-5 in a plausible class, {10 * args.check_per_class} CIFAR-10 test images")
        check = preprocessing_check(zip_path, args.check_per_class, tmp)
        print(f"\n2. 5-way 5-shot, {args.episodes} episodes (seed {args.seed}), "
              f"{10 * args.fewshot_per_class} CIFAR-10 test images, accuracy % +- 95% CI")
        from fewshot.backbones import create_backbone

        net = create_backbone("efficientnet_lite0", in_channels=3, image_size=224, num_classes=0, pretrained=True)
        runner = ort_embedder(net, 1280, tmp, "features")
        fs: dict[str, Any] = {}
        for r in RESAMPLES:
            images, labels, _ = load_test(zip_path, args.fewshot_per_class, r)
            z = embed(runner, images)
            fs[r] = few_shot(z, labels, episodes=args.episodes, seed=args.seed)
            if r == "bilinear":
                zf = (z + embed(runner, np.ascontiguousarray(images[..., ::-1]))) / 2
                fs["bilinear+flip"] = few_shot(zf, labels, episodes=args.episodes, seed=args.seed)
                sym = create_backbone("efficientnet_lite0", in_channels=3, image_size=224, num_classes=0,
                                      pretrained=True, padding="symmetric")
                zs = embed(ort_embedder(sym, 1280, tmp, "symmetric"), images)
                fs["bilinear, symmetric padding"] = few_shot(zs, labels, episodes=args.episodes, seed=args.seed)
        cols = list(fs)
        short = {"bilinear+flip": "bilinear+flip", "bilinear, symmetric padding": "bilinear symm."}
        print(f"  {'features / rule':21s}" + "".join(f"{short.get(r, r):>15s}" for r in cols))
        for k in fs[RESAMPLES[0]]:
            print(f"  {k:21s}" + "".join(f"{fs[r][k]['mean']:8.2f} +-{fs[r][k]['ci95']:4.2f}" for r in cols))
        print(f"\n3. ONNX Runtime latency, batch 1, 2 threads ({args.latency_runs} runs)")
        lat = latency(tmp, load_test(zip_path, 2, "bilinear")[0], args.latency_runs)
        print(f"  median {lat['median_ms']} ms, p90 {lat['p90_ms']} ms, min {lat['min_ms']} ms; model.onnx {lat['onnx_mb']} MiB")
    import onnxruntime

    out = {"meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
                    "platform": platform.platform(), "cpus": os.cpu_count(),
                    "command": " ".join(["python", *sys.argv]), "seed": args.seed, "episodes": args.episodes},
           "preprocessing_check": check, "few_shot_5w5s": fs, "latency": lat,
           "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\nraw: {args.out} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
