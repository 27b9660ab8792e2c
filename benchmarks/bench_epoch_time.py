"""Time per pre-training epoch on miniImageNet (38,399 training images at 84x84 RGB) on this machine:
one trainer step of the `pretrain` learner (cross-entropy over 64 classes, SGD) for each backbone,
under the precision the trainer picks (`select_precision`: bf16 autocast + channels_last on CPUs
with native bf16) and under fp32, interleaved; the epoch time is the median step time x steps per epoch.
Random pixels: a step's cost does not depend on them.

    .venv/bin/python benchmarks/bench_epoch_time.py [--backbones conv4 resnet12] [--batch 64] [--repeats 5]

Raw numbers: benchmarks/results/epoch_time.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _learner_timing import interleaved, machine, summary, write_json  # noqa: E402

from fewshot.backbones import create_backbone  # noqa: E402
from fewshot.learners import create_learner  # noqa: E402
from fewshot.precision import FP32, select_precision  # noqa: E402
from fewshot.training.trainer import Trainer  # noqa: E402

TRAIN_IMAGES = 38_399  # miniImageNet's 64 training classes after cleaning (fewshot prepare)


def trainer_step(backbone: str, policy: object, batch: int):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    learner = create_learner("pretrain", create_backbone(backbone, in_channels=3, image_size=84), num_classes=64)
    learner.set_precision(policy)  # type: ignore[arg-type]
    trainer = Trainer(learner, torch.optim.SGD(learner.parameters(), lr=0.05, momentum=0.9))
    data = (torch.rand(batch, 3, 84, 84, generator=g), torch.randint(0, 64, (batch,), generator=g))
    return lambda: trainer.step(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["conv4", "resnet12"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/epoch_time.json")
    args = ap.parse_args()
    info = machine()
    auto = select_precision(torch.device("cpu"))
    print(f"machine: {info}\n")
    print(f"| backbone | precision | s/step (batch {args.batch}) | ms/image | minutes per epoch |")
    print("| --- | --- | ---: | ---: | ---: |")
    rows: dict[str, object] = {}
    for name in args.backbones:
        fns = {f"{name} {p.dtype}{'+channels_last' if p.channels_last else ''}": trainer_step(name, p, args.batch)
               for p in (auto, FP32)}
        for key, ts in interleaved(fns, args.repeats).items():
            s = summary(ts)
            epoch_min = s["median_s"] * TRAIN_IMAGES / args.batch / 60
            rows[key] = {**s, "raw_s": ts, "epoch_min": epoch_min}
            b, prec = key.split(" ", 1)
            print(f"| {b} | {prec} | {s['median_s']:.2f} | {1000 * s['median_s'] / args.batch:.1f} | {epoch_min:.1f} |")
    write_json(args.out, {"machine": info, "args": vars(args), "train_images": TRAIN_IMAGES, "rows": rows})


if __name__ == "__main__":
    main()
