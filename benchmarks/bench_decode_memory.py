"""Peak memory and time of decoding one upload, for hostile and ordinary images.

Each image is decoded by `fewshot.service.images.decode_upload` (the service's path: model input,
thumbnail and preview) in a fresh Python process; the peak resident memory is reset just before
decoding (Linux /proc/self/clear_refs), so the figure is what one image adds to a server's peak.
Target (service hardening issue): no single request raises the peak by more than 200 MB.

    python benchmarks/bench_decode_memory.py [--out benchmarks/results/decode_memory.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "service"))

from hostile_images import (  # noqa: E402
    decode_cost,
    forged_png,
    large_jpeg,
    mpo_bytes,
    palette_png,
    rgba_png,
    sixteen_bit_png,
    tiny_wide_png,
)

CASES = {
    "57-byte PNG declaring 1 x 20,000,000 px (the issue's attack)": tiny_wide_png,
    "forged 4900x4900 16-bit RGBA PNG header, truncated": lambda: forged_png(4900, 4900, 16, 6),
    "16-bit grayscale 5000x5000 PNG": lambda: sixteen_bit_png(5000),
    "RGBA 5000x5000 PNG (the 25 MP limit)": lambda: rgba_png(5000),
    "palette + transparency 5000x5000 PNG": lambda: palette_png(5000),
    "48 MP JPEG (8000x6000)": lambda: large_jpeg(8000, 6000),
    "12 MP JPEG (4000x3000)": lambda: large_jpeg(4000, 3000),
    "phone MPO (two JPEG frames)": mpo_bytes,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="benchmarks/results/decode_memory.json")
    args = p.parse_args()
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in CASES.items():
            data = make()
            for mode, size in (("L", 28), ("RGB", 84)):
                peak_mb, seconds, outcome = decode_cost(data, tmp, mode, size)
                rows.append({"image": name, "bytes": len(data), "model_input": f"{mode} {size}x{size}",
                             "peak_mb": peak_mb, "seconds": seconds, "outcome": outcome})
    print("| image | bytes | model input | outcome | peak +MB | s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['image']} | {r['bytes']:,} | {r['model_input']} | {r['outcome']} | {r['peak_mb']:.1f} | "
              f"{r['seconds']:.3f} |")
    worst = max(r["peak_mb"] for r in rows)
    print(f"\nworst peak: +{worst:.1f} MB (target <= 200 MB: {'met' if worst <= 200 else 'MISSED'})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "worst_peak_mb": worst, "torch": torch.__version__,
                               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                               "cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                               "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
