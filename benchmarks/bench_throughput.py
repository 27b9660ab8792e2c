"""Conv-4 training throughput and achieved GFLOP/s beside the machine's own measured peak.

Settings, all timed in one process and interleaved in rounds so machine load hits all alike:

* ProtoNet training steps (forward + backward + Adam step), built as `fewshot train` builds them:
  `create_backbone("conv4")` -> `create_learner("protonet")` -> `set_precision(policy)` ->
  `Trainer(learner, Adam)`, then `trainer.step(episode)`. Synthetic random images (explicit
  `torch.Generator`, no global seeding):
  - 28 px: 1x28x28 (Omniglot-like), a 60-way 5-shot 5-query episode = 600 images;
  - 84 px: 3x84x84 (miniImageNet-like), a 5-way 5-shot 15-query episode = 100 images;
  each at fp32 and at bf16 autocast + channels-last (the CPU fast path of `fewshot.precision`).
* The machine's peak for the same operations, same precisions: an N x N matmul, and a 3x3
  convolution 64 -> 64 channels, forward + backward (input and weight gradients), channels-last,
  on a batch at 84 px.

FLOPs of a training step are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode`
over one `trainer.step` (forward + backward). It counts matmul / convolution FLOPs only (2 per
multiply-add); batch norm, ReLU, pooling, the loss and the optimiser add time but no counted
FLOPs, so a step's GFLOP/s is its convolutions' and matmuls' work over the whole step time.
"% of conv peak" compares it with the convolution peak of the same precision (a Conv-4 step's
FLOPs are 3x3 convolutions); the matmul peak is shown beside it.

The process is set up as `fewshot train` sets up its own: `keep_freed_memory` (glibc keeps freed
tensors' memory for reuse) is turned on before anything is timed, peaks included;
`FEWSHOT_KEEP_FREED_MEMORY=0` measures without it.

    .venv/bin/python benchmarks/bench_throughput.py [--rounds 3] [--seconds 3] [--profile]
    .venv/bin/python benchmarks/bench_throughput.py --quick --out /tmp/throughput.json   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _learner_timing import random_episode  # noqa: E402

from fewshot.backbones import create_backbone  # noqa: E402
from fewshot.learners import create_learner  # noqa: E402
from fewshot.precision import FP32, PrecisionPolicy, keep_freed_memory  # noqa: E402
from fewshot.training.trainer import Trainer  # noqa: E402

BF16_FAST = PrecisionPolicy("bf16", True, "cpu")  # what select_precision picks on native-bf16 CPUs
POLICIES = {"fp32": FP32, "bf16": BF16_FAST}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Sizes:
    """Problem sizes; `--quick` shrinks every one of them."""

    way28: int = 60
    shot28: int = 5
    query28: int = 5
    way84: int = 5
    shot84: int = 5
    query84: int = 15
    matmul_n: int = 4096
    conv_batch: int = 64  # (conv_batch, 64, 84, 84) input of the peak convolution


QUICK = Sizes(way28=10, shot28=1, query28=2, way84=2, shot84=1, query84=2, matmul_n=512, conv_batch=4)


@dataclass
class Bench:
    """One timed setting: `fn` runs it once, doing `flop` counted FLOPs on `images` images."""

    name: str
    kind: str  # "train", "peak-matmul" or "peak-conv"
    dtype: str  # "fp32" or "bf16"
    fn: Callable[[], object]
    flop: int
    images: int = 0  # 0 for the peaks
    flop_by_op: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclass
class Row:
    """A setting's result: medians over every timed call of every round."""

    name: str
    kind: str
    dtype: str
    flop_per_call: int
    images_per_call: int
    median_s: float
    min_s: float
    calls: int
    round_medians_s: list[float]
    gflop_per_s: float
    images_per_s: float | None
    flop_by_op: dict[str, int]
    raw_s: list[list[float]]
    pct_of_conv_peak: float | None = None
    pct_of_matmul_peak: float | None = None


# ---- what is timed ---------------------------------------------------------------------------


def train_step(size: int, channels: int, way: int, shot: int, query: int, policy: PrecisionPolicy,
               seed: int) -> Callable[[], object]:
    """A ProtoNet trainer step on one synthetic episode, built the way `fewshot train` builds it."""
    g = torch.Generator().manual_seed(seed)
    backbone = create_backbone("conv4", in_channels=channels, image_size=size, generator=g)
    learner = create_learner("protonet", backbone).set_precision(policy)
    trainer = Trainer(learner, torch.optim.Adam(learner.parameters(), lr=1e-3))
    episode = random_episode(g, way, shot, query, c=channels, size=size)
    return lambda: trainer.step(episode)


def matmul_peak(n: int, dtype: torch.dtype, g: torch.Generator) -> Callable[[], object]:
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    return lambda: torch.mm(a, b)


def conv_peak(batch: int, dtype: torch.dtype, g: torch.Generator, size: int = 84,
              channels: int = 64) -> Callable[[], object]:
    """3x3 conv (padding 1) forward + backward (input and weight gradients), channels-last."""
    cl = torch.channels_last
    x = torch.randn(batch, channels, size, size, generator=g).to(dtype).contiguous(memory_format=cl)
    w = torch.randn(channels, channels, 3, 3, generator=g).mul_(0.05).to(dtype)
    w = w.contiguous(memory_format=cl)
    grad = torch.randn(batch, channels, size, size, generator=g).to(dtype).contiguous(memory_format=cl)
    x.requires_grad_(True)
    w.requires_grad_(True)

    def step() -> None:
        torch.nn.functional.conv2d(x, w, padding=1).backward(grad)
        x.grad = w.grad = None

    return step


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """Matmul/convolution FLOPs of one call of `fn` (forward + backward), and their split by op."""
    with FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(op).removeprefix("aten."): int(n)
             for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def build(sizes: Sizes, seed: int) -> list[Bench]:
    benches: list[Bench] = []
    cases = [("28px", 28, 1, sizes.way28, sizes.shot28, sizes.query28),
             ("84px", 84, 3, sizes.way84, sizes.shot84, sizes.query84)]
    for label, size, ch, way, shot, query in cases:
        for dname, policy in POLICIES.items():
            fn = train_step(size, ch, way, shot, query, policy, seed)
            fn()  # the first call creates oneDNN primitives and optimiser state
            flop, by_op = count_flops(fn)
            name = f"train {label} {dname}" + (" + channels-last" if policy.channels_last else "")
            benches.append(Bench(name, "train", dname, fn, flop, way * (shot + query), by_op))
    g = torch.Generator().manual_seed(seed)
    n, b = sizes.matmul_n, sizes.conv_batch
    for dname, dtype in DTYPES.items():
        for name, kind, fn in ((f"peak matmul {n}x{n} {dname}", "peak-matmul", matmul_peak(n, dtype, g)),
                               (f"peak conv3x3 64->64 {b}x84px fwd+bwd {dname}", "peak-conv",
                                conv_peak(b, dtype, g))):
            flop, by_op = count_flops(fn)
            benches.append(Bench(name, kind, dname, fn, flop, flop_by_op=by_op))
    return benches


# ---- timing ----------------------------------------------------------------------------------


def timed(fn: Callable[[], object], seconds: float) -> list[float]:
    """Seconds per call of `fn`, calling it for about `seconds` (at least twice)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 2 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run_rounds(benches: list[Bench], rounds: int, seconds: float, warmup: int) -> dict[str, list[list[float]]]:
    """Per setting, per round, the seconds of each call; every round visits every setting once."""
    for b in benches:
        for _ in range(warmup):
            b.fn()
    out: dict[str, list[list[float]]] = {b.name: [] for b in benches}
    for r in range(rounds):
        for b in benches:
            out[b.name].append(timed(b.fn, seconds))
        print(f"  round {r + 1}/{rounds} done (load {os.getloadavg()[0]:.2f})", flush=True)
    return out


def summarise(b: Bench, rounds: list[list[float]]) -> Row:
    flat = [t for r in rounds for t in r]
    med = statistics.median(flat)
    return Row(b.name, b.kind, b.dtype, b.flop, b.images, med, min(flat), len(flat),
               [statistics.median(r) for r in rounds], b.flop / med / 1e9,
               b.images / med if b.images else None, b.flop_by_op, rounds)


def with_peaks(rows: list[Row]) -> list[Row]:
    """Fill each training row's % of the conv and matmul peaks of its precision."""
    peaks = {(r.kind, r.dtype): r.gflop_per_s for r in rows if r.kind != "train"}
    for r in rows:
        if r.kind == "train":
            r.pct_of_conv_peak = 100 * r.gflop_per_s / peaks[("peak-conv", r.dtype)]
            r.pct_of_matmul_peak = 100 * r.gflop_per_s / peaks[("peak-matmul", r.dtype)]
    return rows


def print_table(rows: list[Row]) -> None:
    print("\n### Conv-4 ProtoNet training step vs the machine's peak (one run, interleaved)\n")
    print("GFLOP: FlopCounterMode over one step (forward + backward); matmul/convolution FLOPs only.")
    print("% of peak: the step's GFLOP/s over the same precision's conv3x3 fwd+bwd / matmul peak.\n")
    print("| setting | images/s | GFLOP/step | GFLOP/s | % of conv peak | % of matmul peak | step ms (median) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        gflop, ms = r.flop_per_call / 1e9, 1e3 * r.median_s
        if r.kind == "train":
            print(f"| {r.name} | {r.images_per_s:,.0f} | {gflop:.2f} | {r.gflop_per_s:,.1f} "
                  f"| {r.pct_of_conv_peak:.0f}% | {r.pct_of_matmul_peak:.0f}% | {ms:,.1f} |")
        else:
            print(f"| {r.name} | — | {gflop:.2f} | {r.gflop_per_s:,.1f} | peak | peak | {ms:,.1f} |")


# ---- profile ---------------------------------------------------------------------------------


def profile_step(name: str, fn: Callable[[], object], steps: int, top: int = 15) -> list[dict[str, object]]:
    """Print torch.profiler's top operators by self CPU time over `steps` calls; return them."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages) or 1.0
    print(f"\n### Profile: {name}, {steps} steps, top {top} operators by self CPU time\n")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=top))
    ranked = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "self_cpu_share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps}
            for e in ranked]


# ---- main ------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per setting per round (default 3)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per setting before the rounds")
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round of 0.3 s: a smoke run")
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler's top operators of the 28 px and 84 px bf16 steps")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.rounds < 1 or args.seconds <= 0 or args.warmup < 0:
        ap.error(f"need --rounds >= 1, --seconds > 0, --warmup >= 0; got {args.rounds}, "
                 f"{args.seconds}, {args.warmup}")
    if args.quick:
        args.rounds, args.seconds, args.warmup = 1, 0.3, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()

    info: dict[str, object] = {
        "torch": torch.__version__, "cpu_model": cpu_model(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg(),
    }
    print(f"machine: {info}")
    info["keep_freed_memory"] = keep_freed_memory()  # as the fewshot train command does
    benches = build(sizes, args.seed)
    print(f"timing {len(benches)} settings: {args.rounds} round(s) x {args.seconds} s each")
    raw = run_rounds(benches, args.rounds, args.seconds, args.warmup)
    rows = with_peaks([summarise(b, raw[b.name]) for b in benches])
    print_table(rows)

    profiles = {}
    if args.profile:
        for b in benches:
            if b.kind == "train" and b.dtype == "bf16":
                profiles[b.name] = profile_step(b.name, b.fn, args.profile_steps)
    info["loadavg_end"] = os.getloadavg()
    print(f"\nload average (1, 5, 15 min): start {info['loadavg_start']}, end {info['loadavg_end']}")

    payload = {
        "machine": info, "args": vars(args), "sizes": dataclasses.asdict(sizes),
        "flop_counting": "torch.utils.flop_counter.FlopCounterMode over one trainer step "
                         "(forward + backward); counts matmul/convolution FLOPs only",
        "rows": [dataclasses.asdict(r) for r in rows], "profiles": profiles,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"raw numbers: {out}")


if __name__ == "__main__":
    main()
