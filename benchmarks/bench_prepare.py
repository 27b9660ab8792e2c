"""Benchmark: `prepare` of full Omniglot (32,460 PNGs) or miniImageNet (60,000 JPEGs, 84x84 RGB).

Omniglot comes from the official zips (28x28, mode L); miniImageNet from its stored zip and the
Ravi & Larochelle split files (84x84, mode RGB: the images keep their size, and the cleaning
report drops the 7 duplicate copies SOURCES.md lists).

Each case runs in a fresh Python process so its peak memory (ru_maxrss) is its own:

- cold, pool:   forced rebuild, decoding in a spawn process pool (the default)
- cold, 1 proc: forced rebuild, decoding in the calling process
- warm:         unchanged source, the cache is reused
- cold, pool, tracemalloc: the Python-heap peak of the calling process (slower; not a timing)

    python benchmarks/bench_prepare.py --data ../shared/datasets [--out benchmarks/results/prepare.json]
    python benchmarks/bench_prepare.py --dataset miniimagenet --repeats 2 \
        --cases "cold, pool" "warm (reuse)"     # -> benchmarks/results/prepare_miniimagenet.json

`cpu_s` is the CPU time of the case's process and its decoding workers: on a machine shared with
other work, the wall time grows with the load (recorded) while the CPU time stays.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

CASES = {
    "cold, pool": {"force": True, "workers": None},
    "cold, 1 process": {"force": True, "workers": 1},
    "warm (reuse)": {"force": False, "workers": None},
    "cold, pool, tracemalloc": {"force": True, "workers": None, "tracemalloc": True},
}


def _loadavg() -> float | None:
    """1-minute load average: other processes competing for the CPUs make timings slower."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _maxrss_mib(who: str) -> float | None:
    """Peak resident memory of this process ("self") or its finished children ("children")."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN).ru_maxrss
    return kib / (1024 * 1024) if sys.platform == "darwin" else kib / 1024  # macOS reports bytes


def _cpu_s() -> float | None:
    """User + system CPU seconds of this process and its finished children (the decoding workers)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _source_and_pre(dataset: str, data: Path) -> tuple[Any, Any]:
    from fewshot.data.imageio import Preprocessing
    from fewshot.data.sources import OmniglotSource
    from fewshot.data.splitfiles import miniimagenet_source

    if dataset == "miniimagenet":
        return miniimagenet_source(data), Preprocessing("RGB", 84)
    return OmniglotSource(data), Preprocessing()


def run_case(data: Path, cache_root: Path, case: dict[str, object], dataset: str = "omniglot") -> dict[str, object]:
    """One measurement in this process (the source's listing is timed with the rest)."""
    from fewshot.data.prepare import prepare

    use_tm = bool(case.get("tracemalloc"))
    load_before = _loadavg()
    if use_tm:
        tracemalloc.start()
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    source, pre = _source_and_pre(dataset, data)
    prepared = prepare(
        source, cache_root, pre, progress=False, force=bool(case["force"]), workers=case["workers"]  # type: ignore[arg-type]
    )
    wall_s = time.perf_counter() - t0
    cpu1 = _cpu_s()
    out: dict[str, object] = {
        "wall_s": wall_s,
        "cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
        "reused": prepared.reused,
        "n_files": prepared.report.n_files,
        "n_kept": prepared.report.n_kept,
        "cache_bytes": int(prepared.cache.images.nbytes),
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": _loadavg(),
    }
    if use_tm:
        out["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    out["maxrss_self_mib"] = _maxrss_mib("self")
    out["maxrss_children_mib"] = _maxrss_mib("children")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("FEWSHOT_DATA", str(Path(__file__).resolve().parents[1].parent / "shared" / "datasets")))
    ap.add_argument("--dataset", choices=["omniglot", "miniimagenet"], default="omniglot")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/prepare[_<dataset>].json")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per case (best and all kept)")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: one measurement, JSON on stdout
        print(json.dumps(run_case(Path(args.data), Path(args.cache), CASES[args.one], args.dataset)))
        return 0

    results: dict[str, list[dict[str, object]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            repeats = 1 if CASES[name].get("tracemalloc") else args.repeats
            for _ in range(repeats):
                cmd = [sys.executable, __file__, "--data", args.data, "--dataset", args.dataset, "--cache", tmp,
                       "--one", name]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                results.setdefault(name, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(_table(results))
    results_dir = Path(__file__).resolve().parent / "results"
    out = Path(args.out or results_dir / ("prepare.json" if args.dataset == "omniglot" else f"prepare_{args.dataset}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meta = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "processor": _cpu_model(), "usable_cpus": cpus, "date": time.strftime("%Y-%m-%d %H:%M"),
            "torch": _version("torch"), "pillow": _version("pillow"), "dataset": args.dataset}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nraw numbers: {out}")
    return 0


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _table(results: dict[str, list[dict[str, object]]]) -> str:
    lines = [
        "| case | wall s (best of n) | all runs s | CPU s (best run) | peak RSS main MiB | peak RSS worker MiB | Python heap peak MiB | files / kept | load avg (1 min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        walls = [float(r["wall_s"]) for r in runs]  # type: ignore[arg-type]
        last = runs[-1]
        heap = last.get("tracemalloc_peak_mib")
        best = runs[walls.index(min(walls))]
        lines.append(
            f"| {name} | {min(walls):.2f} (n={len(walls)}) | {', '.join(f'{w:.2f}' for w in walls)} | "
            f"{_fmt1(best.get('cpu_s'))} | "
            f"{_fmt(last['maxrss_self_mib'])} | {_fmt(last['maxrss_children_mib'])} | {_fmt(heap)} | "
            f"{last['n_files']:,} / {last['n_kept']:,} | {_fmt_load(runs)} |"
        )
    return "\n".join(lines)


def _fmt_load(runs: list[dict[str, object]]) -> str:
    loads = [r.get("loadavg_1min_before") for r in runs]
    return ", ".join("-" if v is None else f"{float(v):.1f}" for v in loads)  # type: ignore[arg-type]


def _fmt1(v: object) -> str:
    return "-" if v is None else f"{float(v):.1f}"  # type: ignore[arg-type]


def _fmt(v: object) -> str:
    return "-" if v is None or v == 0 else f"{float(v):.0f}"  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
