"""Episode sampling + materialisation speed from the packed cache, against a Conv-4 training step.

    python benchmarks/bench_episodes.py --data ../shared/datasets --out benchmarks/results/episodes.json
    python benchmarks/bench_episodes.py --dataset miniimagenet --threads 1 \
        --out benchmarks/results/episodes_miniimagenet.json

Omniglot (28x28 L, Vinyals train split): 5-way 1-shot and 20-way 5-shot, 15 queries.
miniImageNet (84x84 RGB, Ravi & Larochelle train split): 5-way 1-shot, 5-way 5-shot, 20-way 5-shot.
Median / p90 time to describe + materialise one episode (from the in-RAM cache and from the
memory-mapped file), episodes/s, and the ratio to a Conv-4 forward + backward pass on the same
episode's images (fp32 eager and the default precision), measured side by side in one run.
`--threads` sets torch's intra-op threads (the float conversion of an episode uses them; on a
shared machine one thread is the steadier number); the count used is recorded.
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
from fewshot.data.imageio import Preprocessing
from fewshot.data.prepare import PreparedData, prepare, prepare_omniglot
from fewshot.data.splitfiles import miniimagenet_source
from fewshot.data.splits import Split, make_splits
from fewshot.episodes import (
    EpisodeSpec,
    describe_episode,
    episode_rng,
    materialise,
    pool_from_split,
)
from fewshot.precision import autocast_context, prepare_input, prepare_model, select_precision


def time_episodes(cache, pool, spec: EpisodeSpec, n: int) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    """Wall and CPU seconds (this process, all threads) per described + materialised episode. On a
    shared machine the wall time includes waits for the CPU; the CPU time does not."""
    wall, cpu = [], []
    for i in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        materialise(cache, describe_episode(pool, spec, episode_rng(0, i)))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


TASKS = {
    "omniglot": ((5, 1), (20, 5)),
    "miniimagenet": ((5, 1), (5, 5), (20, 5)),
}


def load(dataset: str, data: str, cache_dir: str) -> tuple[PreparedData, Split]:
    """The prepared cache and its train split (Vinyals for Omniglot, Ravi & Larochelle for miniImageNet)."""
    if dataset == "omniglot":
        prepared = prepare_omniglot(data, cache_dir, progress=False)
        return prepared, make_splits(prepared.cache, "vinyals", splits_dir=Path(data) / "omniglot/splits/vinyals")["train"]
    prepared = prepare(miniimagenet_source(data), cache_dir, Preprocessing("RGB", 84), progress=False)
    return prepared, make_splits(prepared.cache, "csv")["train"]


def time_step(images: torch.Tensor, prefer: str, n: int) -> list[float]:
    policy = select_precision("cpu", prefer=prefer)
    c, h = int(images.shape[1]), int(images.shape[2])
    model = prepare_model(create_backbone("conv4", in_channels=c, image_size=h), policy)
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


def _times(a: float, b: float | None) -> float | None:
    return None if b is None else a * b


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=os.environ.get("FEWSHOT_DATA", "../shared/datasets"))
    ap.add_argument("--dataset", choices=sorted(TASKS), default="omniglot")
    ap.add_argument("--cache-dir", default=".fewshot-cache")
    ap.add_argument("--episodes", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=20, help="timed Conv-4 steps per task (0: skip the step timing)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/episodes[_<dataset>].json")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = args.out or ("benchmarks/results/episodes.json" if args.dataset == "omniglot"
                       else f"benchmarks/results/episodes_{args.dataset}.json")
    prepared, train = load(args.dataset, args.data, args.cache_dir)
    caches = {"ram": prepared.cache.load_into_memory(), "memmap": prepared.cache}
    rows = []
    for way, shot in TASKS[args.dataset]:
        spec = EpisodeSpec(way, shot, 15)
        ep = materialise(caches["ram"], describe_episode(pool_from_split(caches["ram"], train), spec, episode_rng(0, 0)))
        images = torch.cat([ep.support_x, ep.query_x])
        step32 = statistics.median(time_step(images, "fp32", args.steps)) if args.steps else None
        step_def = statistics.median(time_step(images, "auto", args.steps)) if args.steps else None
        for kind, cache in caches.items():
            pool = pool_from_split(cache, train)
            t, cpu = time_episodes(cache, pool, spec, args.episodes)
            med = statistics.median(t)
            rows.append({"task": f"{way}-way {shot}-shot 15-query", "cache": kind, "images": images.shape[0],
                         "median_ms": 1000 * med, "p90_ms": 1000 * sorted(t)[int(0.9 * len(t))],
                         "cpu_median_ms": 1000 * statistics.median(cpu),
                         "episodes_per_s": 1 / med, "conv4_step_fp32_ms": _times(1000, step32),
                         "conv4_step_default_ms": _times(1000, step_def),
                         "data_fraction_of_fp32_step": _times(med, None if step32 is None else 1 / step32),
                         "data_fraction_of_default_step": _times(med, None if step_def is None else 1 / step_def)})
    print("| task | cache | median ms | p90 ms | CPU median ms | episodes/s | Conv-4 fwd+bwd fp32 ms | default-precision ms | data / step (fp32, default) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['cache']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['cpu_median_ms']:.3f} | "
              f"{r['episodes_per_s']:.0f} | "
              f"{_fmt(r['conv4_step_fp32_ms'], '.1f')} | {_fmt(r['conv4_step_default_ms'], '.1f')} | "
              f"{_fmt(r['data_fraction_of_fp32_step'], '.1%')}, {_fmt(r['data_fraction_of_default_step'], '.1%')} |")
    meta = {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "precision_default": select_precision("cpu").dtype,
            "dataset": args.dataset, "image_shape": list(prepared.cache.image_shape),
            "torch_threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0]}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"machine": meta, "rows": rows}, indent=2))
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":
    main()
