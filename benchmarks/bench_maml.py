"""MAML meta-iterations/s: the library's MAML (functional inner loop + auto precision policy)
vs a plain fp32 per-task clone-and-adapt loop of the same update; plus peak memory of
second- vs first-order MAML at 5-way and 20-way.

Task: 5-way 1-shot, 15 queries, 1x28x28, Conv-4, one inner step, meta-batch 32 (flags).
Target: >= 2x the plain loop. Peak memory: extra resident memory of one train_step, each in a
fresh subprocess (ru_maxrss; CUDA: max_memory_allocated).

    .venv/bin/python benchmarks/bench_maml.py [--meta-batch 32] [--repeats 3] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _learner_timing import interleaved, machine, random_episode, summary, write_json  # noqa: E402

from fewshot.backbones import create_backbone  # noqa: E402
from fewshot.episodes.types import Episode  # noqa: E402
from fewshot.learners import create_learner  # noqa: E402
from fewshot.precision import FP32, select_precision  # noqa: E402
from fewshot.training.trainer import Trainer  # noqa: E402


def plain_conv4() -> nn.Module:
    """Textbook Conv-4 with nn.BatchNorm2d (train-mode batch statistics, as in Finn et al.)."""
    layers: list[nn.Module] = []
    for c_in in (1, 64, 64, 64):
        layers += [
            nn.Conv2d(c_in, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
    return nn.Sequential(*layers, nn.Flatten())


def plain_step(
    net: nn.Module,
    episodes: list[Episode],
    opt: torch.optim.Optimizer,
    lr: float,
    first_order: bool,
) -> None:
    """Per task: clone the weights, one inner SGD step on the support set (zero head), query loss."""
    opt.zero_grad(set_to_none=True)
    for ep in episodes:
        params = {k: v.clone() for k, v in net.named_parameters()}
        w = torch.zeros(ep.n_way, 64, requires_grad=True)
        b = torch.zeros(ep.n_way, requires_grad=True)
        loss = F.cross_entropy(
            F.linear(functional_call(net, params, (ep.support_x,)), w, b), ep.support_y
        )
        grads = torch.autograd.grad(loss, [*params.values(), w, b], create_graph=not first_order)
        fast = {k: v - lr * g for (k, v), g in zip(params.items(), grads)}
        w2, b2 = w - lr * grads[-2], b - lr * grads[-1]
        q = F.linear(functional_call(net, fast, (ep.query_x,)), w2, b2)
        (F.cross_entropy(q, ep.query_y) / len(episodes)).backward()
    opt.step()


def speed(meta_batch: int, repeats: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    eps = [random_episode(g, 5, 1, 15) for _ in range(meta_batch)]
    auto = select_precision("cpu")
    policies = [FP32] + ([auto] if auto != FP32 else [])
    fns = {}
    group = 1 + len(policies)  # rows per order: the plain loop, then the library per policy
    for order, fo in (("second-order", False), ("first-order", True)):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = plain_conv4()
        popt = torch.optim.Adam(net.parameters(), 1e-3)
        fns[f"plain fp32 loop, {order}"] = lambda n=net, o=popt, f=fo: plain_step(n, eps, o, 0.4, f)
        for policy in policies:
            learner = create_learner(
                "maml", create_backbone("conv4", in_channels=1, image_size=28), first_order=fo
            )
            learner.set_precision(policy)
            trainer = Trainer(learner, torch.optim.Adam(learner.parameters(), 1e-3))
            fns[
                f"fewshot MAML ({policy.dtype}{', channels_last' if policy.channels_last else ''}), {order}"
            ] = lambda t=trainer: t.step(eps)
    times = interleaved(fns, repeats)
    print(
        f"\n### MAML 5-way 1-shot 15-query, Conv-4 28x28, 1 inner step, meta-batch {meta_batch}\n"
    )
    print("| implementation | meta-it/s (median) | meta-it/s (best) | speed-up vs plain (median) |")
    print("| --- | ---: | ---: | ---: |")
    keys = list(times)
    rows = {}
    for i, k in enumerate(keys):
        s = summary(times[k])
        base = summary(times[keys[i - i % group]])["median_s"]
        rows[k] = {**s, "it_per_s": 1 / s["median_s"], "speedup": base / s["median_s"]}
        print(
            f"| {k} | {1 / s['median_s']:.3f} | {1 / s['min_s']:.3f} | {base / s['median_s']:.2f}x |"
        )
    return {"policies": [str(p) for p in policies], "rows": rows, "raw_s": times}


def memory_child(n_way: int, first_order: bool, meta_batch: int) -> None:
    """Runs in a subprocess: prints the resident-memory growth of one MAML train_step (MiB)."""
    g = torch.Generator().manual_seed(0)
    eps = [random_episode(g, n_way, 1, 15) for _ in range(meta_batch)]
    learner = create_learner(
        "maml", create_backbone("conv4", in_channels=1, image_size=28), first_order=first_order
    )
    learner.set_precision(select_precision("cpu"))
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # model and data built, no step yet
    Trainer(learner, opt).step(eps)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_growth_mib": (after - before) / 1024, "peak_rss_mib": after / 1024}))


def memory(meta_batch: int) -> dict[str, object]:
    print(
        f"\n### Peak memory of one MAML train_step (meta-batch {meta_batch}, tasks backpropagated one by one)\n"
    )
    print("| n_way | order | peak RSS MiB | growth over model+data MiB |")
    print("| ---: | --- | ---: | ---: |")
    out = {}
    for n_way in (5, 20):
        for fo in (False, True):
            cmd = [
                sys.executable,
                __file__,
                "--memory-child",
                str(n_way),
                str(int(fo)),
                str(meta_batch),
            ]
            res = json.loads(
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            order = "first" if fo else "second"
            out[f"{n_way}-way {order}-order"] = res
            print(
                f"| {n_way} | {order} | {res['peak_rss_mib']:.0f} | {res['peak_growth_mib']:.0f} |"
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-meta-batch", type=int, default=4)
    ap.add_argument("--memory-child", nargs=3, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/bench_maml.json")
    args = ap.parse_args()
    if args.memory_child:
        n_way, fo, mb = args.memory_child
        memory_child(n_way, bool(fo), mb)
        return
    info = machine()
    print(f"machine: {info}")
    result = {"machine": info, "args": vars(args), "speed": speed(args.meta_batch, args.repeats)}
    result["memory"] = memory(args.memory_meta_batch)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
