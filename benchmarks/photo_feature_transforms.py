"""Do simple feature transforms lift the photos bundle's prototypes (issue 18 item 3, the adapted
head's "+2 points" target)? Forced-choice accuracy of cosine nearest prototypes on the photos
bundle's cached ONNX embeddings (`bench_openset_photos.py --sections embed`), per transform:

    raw                 the embedding as served
    sqrt                signed square root (Tukey's power transform, beta = 0.5)
    centre-base         minus the mean embedding of miniImageNet train + validation photos
                        (SimpleShot's CL2N centring; no test class is in that mean)
    sqrt-centre-base    both
and each of them again with the support set's own mean subtracted ("+ support centring").

Episodes: `way` classes x `shot` taught photos, 15 queries each, fixed seeds; miniImageNet *test*
classes and the CIFAR-10 subset's test photos. Means with 95% CI, and the paired difference to raw.

    python benchmarks/photo_feature_transforms.py --episodes 300

ImageNet-1k trained the backbone's weights and covers miniImageNet's test classes: these are not
few-shot results in the benchmark's sense.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_openset_photos import CACHE, load_set  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CELLS = [("cifar-test", 5, 5), ("cifar-test", 5, 10), ("mini-test", 5, 10), ("mini-test", 10, 10)]


def signed_sqrt(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.sqrt(np.abs(x))


def transforms(base: np.ndarray) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Each transform, its means taken from `base` (N, D): train + validation photos only."""
    mean, sqrt_mean = base.mean(0), signed_sqrt(base).mean(0)
    return {"raw": lambda x: x, "sqrt": signed_sqrt, "centre-base": lambda x: x - mean,
            "sqrt-centre-base": lambda x: signed_sqrt(x) - sqrt_mean}


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def accuracy(pool: list[np.ndarray], way: int, shot: int, f: Callable[[np.ndarray], np.ndarray],
             centre_support: bool, episodes: int, seed: int) -> np.ndarray:
    """(episodes,) forced-choice accuracy of cosine prototypes under transform `f`."""
    acc = np.zeros(episodes)
    yq = np.repeat(np.arange(way), 15)
    for e in range(episodes):
        rng = np.random.default_rng([seed, way, shot, e])
        classes = rng.choice(len(pool), way, replace=False)
        picks = [rng.choice(len(pool[c]), shot + 15, replace=False) for c in classes]
        xs = np.stack([f(pool[c][p[:shot]]) for c, p in zip(classes, picks)])  # (way, shot, D)
        xq = np.concatenate([f(pool[c][p[shot:]]) for c, p in zip(classes, picks)])
        if centre_support:
            m = xs.reshape(-1, xs.shape[-1]).mean(0)
            xs, xq = xs - m, xq - m
        acc[e] = np.mean((unit(xq) @ unit(unit(xs).mean(1)).T).argmax(1) == yq)
    return acc


def ci(v: np.ndarray) -> dict[str, float]:
    """Mean and 95% interval in points (`mean_ci95`, the protocol's convention)."""
    from fewshot.training.evaluate import mean_ci95

    m, h = mean_ci95(v)
    return {"mean": 100 * m, "ci95": 100 * h}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "photo_feature_transforms.json")
    args = p.parse_args()
    sets = {s: load_set(args.cache, s) for s in ("mini-train", "mini-val", "mini-test", "cifar-test")}
    fs = transforms(np.concatenate(sets["mini-train"] + sets["mini-val"]))
    res: dict[str, object] = {
        "command": "python benchmarks/photo_feature_transforms.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(), "numpy": np.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "episodes": args.episodes, "seed": args.seed,
        "embed_report": json.loads((args.cache / "embed_report.json").read_text())}
    rows = ["| photos | way | shot | transform | forced accuracy | - raw (paired) | + support centring | - raw (paired) |",
            "|" + "---|" * 8]
    cells: dict[str, object] = {}
    for s, w, k in CELLS:
        raw = accuracy(sets[s], w, k, fs["raw"], False, args.episodes, args.seed)
        for name, f in fs.items():
            a = raw if name == "raw" else accuracy(sets[s], w, k, f, False, args.episodes, args.seed)
            b = accuracy(sets[s], w, k, f, True, args.episodes, args.seed)
            r = {"plain": ci(a), "plain_minus_raw": ci(a - raw), "support_centred": ci(b),
                 "support_centred_minus_raw": ci(b - raw)}
            cells[f"{s}/{w}/{k}/{name}"] = r
            rows.append(f"| {s} | {w} | {k} | {name} | " + " | ".join(
                f"{r[c]['mean']:+.2f} ± {r[c]['ci95']:.2f}" if "minus" in c else f"{r[c]['mean']:.2f} ± {r[c]['ci95']:.2f}"
                for c in ("plain", "plain_minus_raw", "support_centred", "support_centred_minus_raw")) + " |")
            print(rows[-1], flush=True)
    res["cells"] = cells
    args.out.write_text(json.dumps(res, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
