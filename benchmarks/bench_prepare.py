"""Benchmark: `prepare` of full Omniglot (32,460 PNGs) from the official zips.

Each case runs in a fresh Python process so its peak memory (ru_maxrss) is its own:

- cold, pool:   forced rebuild, decoding in a spawn process pool (the default)
- cold, 1 proc: forced rebuild, decoding in the calling process
- warm:         unchanged source, the cache is reused
- cold, pool, tracemalloc: the Python-heap peak of the calling process (slower; not a timing)

    python benchmarks/bench_prepare.py --data ../shared/datasets [--out benchmarks/results/prepare.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

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


def run_case(data: Path, cache_root: Path, case: dict[str, object]) -> dict[str, object]:
    """One measurement in this process."""
    from fewshot.data.prepare import prepare_omniglot

    use_tm = bool(case.get("tracemalloc"))
    load_before = _loadavg()
    if use_tm:
        tracemalloc.start()
    t0 = time.perf_counter()
    prepared = prepare_omniglot(
        data, cache_root, progress=False, force=bool(case["force"]), workers=case["workers"]  # type: ignore[arg-type]
    )
    wall_s = time.perf_counter() - t0
    out: dict[str, object] = {
        "wall_s": wall_s,
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
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "prepare.json"))
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per case (best and all kept)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: one measurement, JSON on stdout
        print(json.dumps(run_case(Path(args.data), Path(args.cache), CASES[args.one])))
        return 0

    results: dict[str, list[dict[str, object]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in CASES.items():
            repeats = 1 if case.get("tracemalloc") else args.repeats
            for _ in range(repeats):
                cmd = [sys.executable, __file__, "--data", args.data, "--cache", tmp, "--one", name]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                results.setdefault(name, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(_table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meta = {"python": platform.python_version(), "platform": platform.platform(), "usable_cpus": cpus}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nraw numbers: {out}")
    return 0


def _table(results: dict[str, list[dict[str, object]]]) -> str:
    lines = [
        "| case | wall s (best of n) | all runs s | peak RSS main MiB | peak RSS worker MiB | Python heap peak MiB | files / kept | load avg (1 min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        walls = [float(r["wall_s"]) for r in runs]  # type: ignore[arg-type]
        last = runs[-1]
        heap = last.get("tracemalloc_peak_mib")
        lines.append(
            f"| {name} | {min(walls):.2f} (n={len(walls)}) | {', '.join(f'{w:.2f}' for w in walls)} | "
            f"{_fmt(last['maxrss_self_mib'])} | {_fmt(last['maxrss_children_mib'])} | {_fmt(heap)} | "
            f"{last['n_files']:,} / {last['n_kept']:,} | {_fmt_load(runs)} |"
        )
    return "\n".join(lines)


def _fmt_load(runs: list[dict[str, object]]) -> str:
    loads = [r.get("loadavg_1min_before") for r in runs]
    return ", ".join("-" if v is None else f"{float(v):.1f}" for v in loads)  # type: ignore[arg-type]


def _fmt(v: object) -> str:
    return "-" if v is None or v == 0 else f"{float(v):.0f}"  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
