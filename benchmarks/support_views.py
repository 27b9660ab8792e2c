"""Support-set views at test time for a zoo bundle (issue 15: the miniImageNet target first).

RFS (Tian et al. 2020; `eval_fewshot.py --n_aug_support_samples 5`) fits its logistic-regression
probe on 5 copies of every support image, each through the *training* augmentation (8-pixel padded
random crop, colour jitter 0.4, flip), and never augments queries. Our bundles fit the probe on the
support images alone. Does adding views of the support images buy accuracy, and which views?

Measured on the *validation* classes (16 classes of the Ravi split, never trained on and never used
for the test numbers), so a winner can be chosen without touching the test classes. Same episodes
for every variant (seeded by episode index), the bundle's ONNX embedder and its served rule
(`fewshot.decision.episode`); queries are never augmented. Variants (support examples per image):

    plain          the image alone (served by bundles without views)                   1
    mirror         + its left-right mirror                                             2
    rfs5           5 training-augmented copies, no plain copy (RFS's default)          5
    plain+aug4     the image + 4 training-augmented copies                             5
    shift4         the image and 4 shifted copies (corner crops of the image edge-      5
                   padded by --shift pixels; export serves default_shift: 6 at 84 px)
    shift4+mirror  the same and the mirror of each: deterministic, so a service could   10
                   store them
    *-mean         the same views averaged into one embedding per image: what is served  1
                   (`fewshot.decision.views`, chosen at export by `export.views: auto`);
                   for a nearest-prototype rule the same classes as keeping every view

Random augmentations are drawn from a generator seeded by (seed, episode), so runs repeat. For
characters (an Omniglot entry: `--way 20 --shift 2 --variants plain shift4 shift4-mean`) leave out
the mirror and the colour-jittered copies (`rfs5`, `plain+aug4` need RGB).

    python benchmarks/support_views.py [--entry miniimagenet-pretrain-conv4-rfs] [--split val] \
        [--episodes 600] [--out benchmarks/results/support_views.json]

`--probe-cs 1 4 16` scores every variant with each probe regularisation C (rows VARIANT@C, the
paired base is plain at the first C). The probe's prior weighs ||W||^2 / (2 C n) against the mean
cross-entropy of its n rows: views kept as extra rows multiply n, so they also weaken the prior;
this separates that from what the views themselves add.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "mirror", "rfs5", "plain+aug4", "shift4", "shift4+mirror", "mirror-mean", "shift4-mean",
            "shift4+mirror-mean")


def views(variant: str, images: np.ndarray, aug: Any, rng: np.random.Generator, shift: int) -> list[np.ndarray]:
    """The support examples of one variant: the served views (`fewshot.decision.view_images`) or
    RFS's randomly augmented copies."""
    from fewshot.decision import view_images
    from fewshot.episodes.materialise import augment

    variant = variant.removesuffix("-mean")
    if variant == "rfs5":
        return [augment(images, aug, rng) for _ in range(5)]
    if variant == "plain+aug4":
        return [images] + [augment(images, aug, rng) for _ in range(4)]
    if variant not in {"plain", "mirror", "shift4", "shift4+mirror"}:
        raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return view_images(images, "none" if variant == "plain" else variant, shift)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entry", default="miniimagenet-pretrain-conv4-rfs")
    ap.add_argument("--split", default="val", choices=["val", "test"])
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--way", type=int, default=5)
    ap.add_argument("--shift", type=int, default=8, help="pixels of the shifted views (measured at 8 for 84 px, 2 for 28 px)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--probe-cs", type=float, nargs="+", default=None,
                    help="score every variant with each of these probe regularisations C (a probe head "
                         "only; default: the bundle's own); rows are named VARIANT@C, the first C's plain is the base")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "support_views.json")
    args = ap.parse_args()

    import torch

    from fewshot.artifacts.bundle import load_bundle
    from fewshot.artifacts.embedders import MemoEmbed
    from fewshot.artifacts.zoo import get_entry
    from fewshot.decision.served import episode
    from fewshot.episodes.materialise import Augment, load_rows
    from fewshot.episodes.sampling import EpisodeSpec, describe_episode, episode_rng
    from fewshot.training.evaluate import mean_ci95
    from fewshot.workflows.zoo import entry_data

    entry = get_entry(args.entry)
    bundle = load_bundle(entry.bundle)
    data = entry_data(entry, progress=True)
    pool = data.pool(args.split)
    rule = bundle.decision_rule
    cs = args.probe_cs or [rule.probe_c]
    if args.probe_cs and rule.rule != "probe":
        raise SystemExit(f"--probe-cs needs a probe head; {args.entry} serves {rule.rule!r}")
    rules = {c: replace(rule, probe_c=c) for c in cs}
    names = [v if args.probe_cs is None else f"{v}@{c:g}" for c in cs for v in args.variants]
    aug = Augment(crop_pad=8, hflip=True, color_jitter=0.4)  # RFS's transform_A
    memo = MemoEmbed(bundle.onnx_embedder.embed)  # plain, mirrored and shifted views repeat across episodes
    embed_random = bundle.onnx_embedder.embed  # augmented copies never repeat

    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for shot in args.shots:
        spec = EpisodeSpec(args.way, shot, 15)
        acc: dict[str, list[float]] = {v: [] for v in names}
        for i in range(args.episodes):
            desc = describe_episode(pool, spec, episode_rng(args.seed, i))
            rows = np.concatenate([desc.support_rows, desc.query_rows])
            labels = np.concatenate([desc.support_labels, desc.query_labels])
            images = load_rows(data.cache, rows, desc.rotations[labels])
            ns = len(desc.support_rows)
            sx, qx = images[:ns], images[ns:]
            ys, yq = desc.support_labels, desc.query_labels
            zq = memo(qx)
            for v in args.variants:
                rng = np.random.default_rng([args.seed, 777, shot, i])
                vs = views(v, sx, aug, rng, args.shift)
                first_random = {"rfs5": 0, "plain+aug4": 1}.get(v, len(vs))  # views before it repeat
                zs = np.concatenate([(memo if k < first_random else embed_random)(x) for k, x in enumerate(vs)])
                for c, r in rules.items():
                    if v.endswith("-mean"):  # one row per support image: the mean of its views
                        answer = episode(r, zs.reshape(len(vs), len(sx), -1).mean(0), ys, args.way, zq)
                    else:
                        answer = episode(r, zs, np.tile(ys, len(vs)), args.way, zq)
                    acc[v if args.probe_cs is None else f"{v}@{c:g}"].append(
                        float(np.mean(answer.preference.argmax(1) == yq)))
            if (i + 1) % 100 == 0:
                print(f"  {args.way}w{shot}s: {i + 1}/{args.episodes} episodes ({time.perf_counter() - t0:.0f} s)", flush=True)
        base_name = names[0].split("@")[0] == "plain" and names[0]
        base = np.asarray(acc[base_name]) if base_name else None
        for v, a in acc.items():
            arr = np.asarray(a)
            mean, ci = mean_ci95(arr)
            row = {"mean": mean, "ci95": ci}
            if base is not None and v != base_name:
                d_mean, d_ci = mean_ci95(arr - base)
                row.update({"minus_plain": d_mean, "minus_plain_ci95": d_ci})
            results[f"{args.way}w{shot}s/{v}"] = row

    print(f"\n### {args.entry}: support views, {args.split} classes, {args.way}-way, {args.episodes} episodes, "
          f"15 queries\n")
    print("| shot | variant | accuracy | minus plain (paired) |")
    print("|---|---|---:|---:|")
    for key, r in results.items():
        shot, v = key.split("/")
        diff = f"{100 * r['minus_plain']:+.2f} +- {100 * r['minus_plain_ci95']:.2f}" if "minus_plain" in r else ""
        print(f"| {shot} | {v} | {100 * r['mean']:.2f} +- {100 * r['ci95']:.2f} | {diff} |")
    out = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
           "entry": args.entry, "bundle_id": bundle.bundle_id,
           "rule": rule.to_dict(), "probe_cs": args.probe_cs, "split": args.split, "way": args.way, "shift": args.shift,
           "episodes": args.episodes, "seed": args.seed,
           "wall_s": round(time.perf_counter() - t0, 1), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"raw: {args.out}")


if __name__ == "__main__":
    main()
