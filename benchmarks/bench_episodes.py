"""Episode sampling + materialisation speed from the packed cache, against a Conv-4 training step.

    python benchmarks/bench_episodes.py --data ../shared/datasets --out benchmarks/results/episodes.json

For 5-way 1-shot and 20-way 5-shot (15 queries) Omniglot episodes of the Vinyals train split:
median / p90 time to describe + materialise one episode (from the in-RAM cache and from the
memory-mapped file), episodes/s, and the ratio to a Conv-4 forward + backward pass on the same
episode's images (fp32 eager and the default precision), measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fewshot.backbones import create_backbone
from fewshot.data.prepare import prepare_omniglot
from fewshot.data.splits import make_splits
from fewshot.episodes import (
    EpisodeSpec,
    describe_episode,
    episode_rng,
    materialise,
    pool_from_split,
)
from fewshot.precision import autocast_context, prepare_input, prepare_model, select_precision


def time_episodes(cache, pool, spec: EpisodeSpec, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        materialise(cache, describe_episode(pool, spec, episode_rng(0, i)))
        out.append(time.perf_counter() - t0)
    return out


def time_step(images: torch.Tensor, prefer: str, n: int) -> list[float]:
    policy = select_precision("cpu", prefer=prefer)
    model = prepare_model(create_backbone("conv4", in_channels=1, image_size=28), policy)
    opt = torch.optim.Adam(model.parameters())
    x = prepare_input(images, policy)
    out = []
    for i in range(n + 3):
        t0 = time.perf_counter()
        with autocast_context(policy, "cpu"):
            loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 3:
            out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=os.environ.get("FEWSHOT_DATA", "../shared/datasets"))
    ap.add_argument("--cache-dir", default=".fewshot-cache")
    ap.add_argument("--episodes", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/episodes.json")
    args = ap.parse_args()
    prepared = prepare_omniglot(args.data, args.cache_dir, progress=False)
    splits = make_splits(prepared.cache, "vinyals", splits_dir=Path(args.data) / "omniglot/splits/vinyals")
    caches = {"ram": prepared.cache.load_into_memory(), "memmap": prepared.cache}
    rows = []
    for way, shot in ((5, 1), (20, 5)):
        spec = EpisodeSpec(way, shot, 15)
        ep = materialise(caches["ram"], describe_episode(pool_from_split(caches["ram"], splits["train"]), spec, episode_rng(0, 0)))
        images = torch.cat([ep.support_x, ep.query_x])
        step32 = statistics.median(time_step(images, "fp32", args.steps))
        step_def = statistics.median(time_step(images, "auto", args.steps))
        for kind, cache in caches.items():
            pool = pool_from_split(cache, splits["train"])
            t = time_episodes(cache, pool, spec, args.episodes)
            med = statistics.median(t)
            rows.append({"task": f"{way}-way {shot}-shot 15-query", "cache": kind, "images": images.shape[0],
                         "median_ms": 1000 * med, "p90_ms": 1000 * sorted(t)[int(0.9 * len(t))],
                         "episodes_per_s": 1 / med, "conv4_step_fp32_ms": 1000 * step32,
                         "conv4_step_default_ms": 1000 * step_def, "data_fraction_of_fp32_step": med / step32,
                         "data_fraction_of_default_step": med / step_def})
    print("| task | cache | median ms | p90 ms | episodes/s | Conv-4 fwd+bwd fp32 ms | default-precision ms | data / step (fp32, default) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['cache']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['episodes_per_s']:.0f} | "
              f"{r['conv4_step_fp32_ms']:.1f} | {r['conv4_step_default_ms']:.1f} | "
              f"{100 * r['data_fraction_of_fp32_step']:.1f}%, {100 * r['data_fraction_of_default_step']:.1f}% |")
    meta = {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "precision_default": select_precision("cpu").dtype}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
