"""Learner speed: (1) precision fast path for a Conv-4 training step, (2) per-learner step overhead.

(1) Conv-4 + linear head, cross-entropy, SGD step on B Omniglot-sized images (1x28x28), fp32
    eager vs channels_last vs bf16 autocast vs both vs the policy `select_precision` picks.
    Target: the chosen policy >= 2.5x fp32 eager.
(2) For every learner: one trainer step (learner.compute + Trainer) minus a plain backbone forward+backward+step on the same
    images, as a fraction of the plain time. Target: <= 10% for ProtoNet.

    .venv/bin/python benchmarks/bench_learners.py [--batch 200] [--repeats 7] [--out ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _learner_timing import interleaved, machine, random_episode, summary, write_json  # noqa: E402

from fewshot.backbones import create_backbone  # noqa: E402
from fewshot.learners import create_learner  # noqa: E402
from fewshot.precision import FP32, PrecisionPolicy, autocast_context, select_precision  # noqa: E402
from fewshot.training.trainer import Trainer  # noqa: E402


def conv4_step(policy: PrecisionPolicy, batch: int, seed: int = 0):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        create_backbone("conv4", in_channels=1, image_size=28), torch.nn.Linear(64, 964)
    )
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 964, (batch,))
    if policy.channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        with autocast_context(policy, "cpu"):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def precision_table(batch: int, repeats: int) -> dict[str, object]:
    chosen = select_precision("cpu")
    policies = {
        "fp32 eager": FP32,
        "fp32 channels_last": PrecisionPolicy("fp32", True),
        "bf16 autocast": PrecisionPolicy("bf16", False),
        "bf16 + channels_last": PrecisionPolicy("bf16", True),
    }
    times = interleaved({k: conv4_step(p, batch) for k, p in policies.items()}, repeats)
    base = summary(times["fp32 eager"])["median_s"]
    print(f"\n### Conv-4 training step, batch {batch} x 1x28x28 (auto policy: {chosen})\n")
    print("| setting | img/s (median) | img/s (best) | speed-up vs fp32 eager (median) |")
    print("| --- | ---: | ---: | ---: |")
    rows = {}
    for k, ts in times.items():
        s = summary(ts)
        rows[k] = {**s, "img_per_s": batch / s["median_s"], "speedup": base / s["median_s"]}
        print(
            f"| {k} | {batch / s['median_s']:,.0f} | {batch / s['min_s']:,.0f} | {base / s['median_s']:.2f}x |"
        )
    return {"auto_policy": str(chosen), "rows": rows, "raw_s": times}


def time_learner(
    name: str,
    policy: PrecisionPolicy,
    meta: list,
    images: torch.Tensor,
    labels: torch.Tensor,
    repeats: int,
) -> dict[str, list[float]]:
    """Interleaved timings of one trainer step of the learner and of a plain backbone step on its images."""
    kw = {"num_classes": 64} if name == "pretrain" else {}
    learner = create_learner(name, create_backbone("conv4", in_channels=1, image_size=28), **kw)
    learner.set_precision(policy)
    opt = torch.optim.SGD(learner.parameters(), lr=1e-3)
    batch = (images, labels) if learner.data_kind == "batches" else meta
    x = learner.prep(images)

    def plain() -> None:
        with learner.autocast():
            loss = learner.backbone(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    trainer = Trainer(learner, opt)
    return interleaved({"step": lambda: trainer.step(batch), "plain": plain}, repeats)


def overhead_table(repeats: int, policy: PrecisionPolicy) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    meta = [random_episode(g, 5, 1, 15) for _ in range(4)]  # 4 tasks x 80 images
    images = torch.cat([t for ep in meta for t in (ep.support_x, ep.query_x)])
    labels = torch.randint(0, 64, (images.shape[0],), generator=g)
    results: dict[str, object] = {}
    print(
        f"\n### Step overhead vs plain backbone forward+backward+step ({images.shape[0]} images, {policy.dtype})\n"
    )
    print("| learner | trainer step ms | plain fwd+bwd ms | overhead |")
    print("| --- | ---: | ---: | ---: |")
    for name in ["protonet", "anil", "fomaml", "maml", "metasgd", "reptile", "pretrain"]:
        times = time_learner(name, policy, meta, images, labels, repeats)
        t_step, t_plain = summary(times["step"])["median_s"], summary(times["plain"])["median_s"]
        over = (t_step - t_plain) / t_plain
        results[name] = {"step_s": times["step"], "plain_s": times["plain"], "overhead": over}
        print(f"| {name} | {t_step * 1e3:.0f} | {t_plain * 1e3:.0f} | {over:+.0%} |")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--overhead-repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/bench_learners.json")
    args = ap.parse_args()
    info = machine()
    print(f"machine: {info}")
    prec = precision_table(args.batch, args.repeats)
    over = overhead_table(args.overhead_repeats, select_precision("cpu"))
    write_json(args.out, {"machine": info, "args": vars(args), "precision": prec, "overhead": over})


if __name__ == "__main__":
    main()
