"""CPU speed of the zoo's bundles as served: ONNX Runtime, one intra-op thread, per image.

For each entry of `zoo/` (or those named): its `bundle/model.onnx` on random float input of its
input's shape, batch 1 and batch 64, median ms per image over --rounds rounds; the
models alternate inside every round, so drifting load on the machine hits all alike. Parameters
are counted from the bundle's weights. The issue's "at least 10x faster per image than its
teacher" is the ratio of two rows.

    python benchmarks/bench_zoo_speed.py [--entries NAME ...] [--rounds 30] [--out benchmarks/results/zoo_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _params(bundle: Path) -> int:
    from safetensors.numpy import load_file

    return int(sum(v.size for k, v in load_file(str(bundle / "weights.safetensors")).items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))))


def main(argv: list[str] | None = None) -> None:
    from fewshot.artifacts.bundle import Manifest
    from fewshot.artifacts.zoo import list_entries

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", nargs="*", help="zoo names (default: every entry)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/zoo_speed.json"))
    args = p.parse_args(argv)
    entries = [e for e in list_entries() if not args.entries or e.name in args.entries]
    if not entries:
        raise SystemExit(f"no zoo entries match {args.entries}; `fewshot zoo` lists them")
    models = {}
    for e in entries:
        m = Manifest.read(e.bundle)
        sess = _session(e.bundle / "model.onnx")
        shape = tuple(int(d) for d in sess.get_inputs()[0].shape[1:])  # (C, H, W); the batch is named
        rng = np.random.default_rng(0)
        inputs = {b: rng.integers(0, 256, (b, *shape)).astype(np.float32) for b in (1, 64)}
        models[e.name] = (sess, sess.get_inputs()[0].name, inputs, m.embedding_dim, _params(e.bundle))
    times: dict[str, dict[int, list[float]]] = {n: {1: [], 64: []} for n in models}
    for _ in range(args.rounds):
        for name, (sess, inp, inputs, _, _) in models.items():
            for b, x in inputs.items():
                sess.run(None, {inp: x})  # warm
                reps = 20 if b == 1 else 2
                t0 = time.perf_counter()
                for _ in range(reps):
                    sess.run(None, {inp: x})
                times[name][b].append(1000 * (time.perf_counter() - t0) / reps / b)
    rows = [{"entry": n, "params": models[n][4], "embedding_dim": models[n][3],
             "ms_per_image_batch1": statistics.median(t[1]), "ms_per_image_batch64": statistics.median(t[64])}
            for n, t in times.items()]
    print("| entry | parameters | embedding | ms / image, batch 1 | ms / image, batch 64 |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['entry']} | {r['params']:,} | {r['embedding_dim']} | {r['ms_per_image_batch1']:.4f} | "
              f"{r['ms_per_image_batch64']:.4f} |")
    out = {"rows": rows, "rounds": args.rounds, "command": "python benchmarks/bench_zoo_speed.py " + " ".join(sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                       "loadavg_1m_after": os.getloadavg()[0]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"\nraw numbers: {args.out}")


if __name__ == "__main__":
    main()
