"""MAML meta-iterations/s and peak memory: the library's closed-form fast path at fp32 and at
bf16 (where the CPU has native bf16) against a plain fp32 per-task clone-and-adapt loop of the
same update (`plain_step`), second and first order.

Task: 5-way 1-shot, 15 queries, 1x28x28, Conv-4, one inner step, meta-batch 32 (flags).
Protocol: every (order, variant) runs in a fresh process, `--rounds` times, the rounds
interleaved (round r runs every variant once, in an order rotated per round), so slow drift in
the machine hits all variants alike; each process sets up as `fewshot train` does
(`keep_freed_memory`), builds its model and data, runs `--warmup` untimed meta-iterations and
`--iters` timed ones. Reported: the median over rounds of each process's median seconds per
meta-iteration, the speed-up over the plain loop of the same order (also in CPU seconds per
meta-iteration: steadier than wall time when the machine is shared), and the process's peak
resident memory (ru_maxrss; its growth over the model and data before the first step).

The machine must be otherwise idle: before starting, other processes' CPU use is measured over
`--load-window` seconds from /proc/stat; above `--max-other-cores` (default 0.25 of a core) the
benchmark refuses to run (exit 3) unless `--force`, which marks the report "loaded". The load
average is printed at the start and the end.

    .venv/bin/python benchmarks/bench_maml.py [--rounds 3] [--iters 8] [--threads N] [--force]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _learner_timing import machine, other_busy_cores, random_episode, write_json  # noqa: E402

from fewshot.backbones import create_backbone  # noqa: E402
from fewshot.episodes.types import Episode  # noqa: E402
from fewshot.learners import create_learner  # noqa: E402
from fewshot.precision import FP32, cpu_has_native_bf16, keep_freed_memory, select_precision  # noqa: E402
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


VARIANTS = ("plain fp32 loop", "fewshot fp32", "fewshot bf16")
ORDERS = ("second", "first")


def child(variant: str, order: str, meta_batch: int, warmup: int, iters: int) -> dict[str, object]:
    """One fresh process: build `variant`, time `iters` meta-iterations, report peak memory."""
    keep_freed_memory()  # as `fewshot train` sets up its process
    first_order = order == "first"
    g = torch.Generator().manual_seed(0)
    eps = [random_episode(g, 5, 1, 15) for _ in range(meta_batch)]
    torch.manual_seed(0)
    if variant == "plain fp32 loop":
        net = plain_conv4()
        opt = torch.optim.Adam(net.parameters(), 1e-3)

        def step() -> object:
            plain_step(net, eps, opt, 0.4, first_order)
            return None
    else:
        learner = create_learner(
            "maml", create_backbone("conv4", in_channels=1, image_size=28), first_order=first_order
        )
        learner.set_precision(FP32 if variant == "fewshot fp32" else select_precision("cpu", prefer="bf16"))
        trainer = Trainer(learner, torch.optim.Adam(learner.parameters(), 1e-3))

        def step() -> object:
            return trainer.step(eps)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(warmup):
        step()
    times, cpu = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"times_s": times, "median_s": statistics.median(times), "cpu_s": cpu,
            "median_cpu_s": statistics.median(cpu), "peak_rss_mib": peak,
            "peak_growth_mib": peak - rss_before, "threads": torch.get_num_threads()}


def run_child(args: argparse.Namespace, variant: str, order: str) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", variant, order, "--meta-batch", str(args.meta_batch),
           "--warmup", str(args.warmup), "--iters", str(args.iters)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child {variant!r} {order}-order failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_line(other: float | None) -> str:
    la = os.getloadavg()
    busy = "n/a" if other is None else f"{other:.2f}"
    return f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; other processes' CPU {busy} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="fresh-process rounds of every variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed meta-iterations per process")
    ap.add_argument("--iters", type=int, default=8, help="timed meta-iterations per process")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each process")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                    help="default: all (bf16 only where the CPU has native bf16)")
    ap.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    ap.add_argument("--load-window", type=float, default=3.0, help="seconds of /proc/stat sampling")
    ap.add_argument("--max-other-cores", type=float, default=0.25,
                    help="refuse to run when other processes use more CPU than this (cores)")
    ap.add_argument("--force", action="store_true", help="run on a loaded machine; the report says so")
    ap.add_argument("--out", default="benchmarks/results/bench_maml.json")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "ORDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(*args.child, args.meta_batch, args.warmup, args.iters)))
        return
    if args.rounds < 1 or args.iters < 1 or args.warmup < 0:
        ap.error(f"need --rounds >= 1, --iters >= 1, --warmup >= 0; got {args.rounds}, {args.iters}, {args.warmup}")
    variants = args.variants or [v for v in VARIANTS if v != "fewshot bf16" or cpu_has_native_bf16()]
    other_start = other_busy_cores(args.load_window)
    start_line = load_line(other_start)
    print(f"start: {start_line}")
    loaded = other_start is not None and other_start > args.max_other_cores
    if loaded and not args.force:
        print(f"refusing to benchmark: other processes use {other_start:.2f} cores (more than "
              f"--max-other-cores {args.max_other_cores}); wait for them to finish, or pass --force to "
              "run anyway with the report marked as loaded", file=sys.stderr)
        raise SystemExit(3)
    info = {**machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "load_start": start_line, "other_cores_start": other_start, "loaded": loaded}
    jobs = [(v, o) for o in args.orders for v in variants]
    raw: dict[str, list[dict[str, object]]] = {f"{v}, {o}-order": [] for v, o in jobs}
    for r in range(args.rounds):
        k = r % len(jobs)
        for v, o in jobs[k:] + jobs[:k]:  # rotated: no variant always runs first or last
            res = run_child(args, v, o)
            raw[f"{v}, {o}-order"].append(res)
            print(f"  round {r + 1}/{args.rounds} {v}, {o}-order: {1 / float(res['median_s']):.3f} it/s, "
                  f"peak {float(res['peak_rss_mib']):.0f} MiB (load {os.getloadavg()[0]:.2f})", flush=True)
    other_end = other_busy_cores(args.load_window)
    info["load_end"], info["other_cores_end"] = load_line(other_end), other_end
    info["loaded"] = loaded or (other_end is not None and other_end > args.max_other_cores)
    title = (f"MAML 5-way 1-shot 15-query, Conv-4 28x28, 1 inner step, meta-batch {args.meta_batch}, "
             f"{args.rounds} fresh-process rounds x {args.iters} meta-iterations")
    print(f"\n### {title}{' (LOADED MACHINE: ratios only)' if info['loaded'] else ''}\n")
    print("| implementation | meta-it/s (median) | vs plain loop | CPU s/meta-it | vs plain loop (CPU time) "
          "| peak RSS MiB | growth MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = {}
    for v, o in jobs:
        key = f"{v}, {o}-order"
        med = statistics.median(float(x["median_s"]) for x in raw[key])
        base_key = f"plain fp32 loop, {o}-order"
        base = statistics.median(float(x["median_s"]) for x in raw[base_key]) if raw.get(base_key) else None
        cpu = statistics.median(float(x["median_cpu_s"]) for x in raw[key])
        cpu_base = (statistics.median(float(x["median_cpu_s"]) for x in raw[base_key])
                    if raw.get(base_key) else None)
        peak = max(float(x["peak_rss_mib"]) for x in raw[key])
        growth = max(float(x["peak_growth_mib"]) for x in raw[key])
        rows[key] = {"median_s": med, "it_per_s": 1 / med, "speedup": None if base is None else base / med,
                     "median_cpu_s": cpu, "cpu_speedup": None if cpu_base is None else cpu_base / cpu,
                     "peak_rss_mib": peak, "peak_growth_mib": growth}
        ratio = "—" if base is None else f"{base / med:.2f}x"
        cpu_ratio = "—" if cpu_base is None else f"{cpu_base / cpu:.2f}x"
        print(f"| {key} | {1 / med:.3f} | {ratio} | {cpu:.2f} | {cpu_ratio} | {peak:.0f} | {growth:.0f} |")
    print(f"\nstart: {start_line}\nend:   {info['load_end']}")
    write_json(args.out, {"machine": info, "args": vars(args), "rows": rows, "raw": raw})


if __name__ == "__main__":
    main()
