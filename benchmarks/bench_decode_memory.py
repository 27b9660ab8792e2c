"""Peak memory, wall time and CPU time of decoding one upload, for hostile and ordinary images.

Each image is decoded by `fewshot.service.images.decode_upload` (the service's path: model input,
thumbnail and preview) in a fresh Python process; the peak resident memory is reset just before
decoding (Linux /proc/self/clear_refs), so the figure is what one image adds to a server's peak.
Targets (issue 16): no single upload raises the peak by more than 200 MB or costs more than 2 s of
CPU. CPU time is the figure to compare on a shared machine (wall time includes waiting for a core).

    python benchmarks/bench_decode_memory.py [--out benchmarks/results/decode_memory.json] [--only TEXT]
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
    decode_costs,
    forged_png,
    large_jpeg,
    lossless_webp,
    mpo_bytes,
    noninterleaved_baseline_jpeg,
    palette_png,
    progressive_scan_bomb,
    rgba_png,
    rle8_bmp,
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
    # issue 16: decoding cost beyond the pixel count
    "progressive 5000x5000 JPEG, AC scan repeated 3,000 times (the CPU bomb)": lambda: progressive_scan_bomb(5000, 3000),
    "progressive 5000x5000 JPEG, 20 scans (the most accepted)": lambda: progressive_scan_bomb(5000, 10),
    "baseline JPEG, one scan per component, 9000x9000 (was drafted: +682 MB)":
        lambda: noninterleaved_baseline_jpeg(9000, 9000),
    "baseline JPEG, one scan per component, 5000x5000": lambda: noninterleaved_baseline_jpeg(5000, 5000),
    "CMYK-like 4 scans, 4330x4330 (the coefficient bound)": lambda: noninterleaved_baseline_jpeg(4330, 4330, 4),
    "lossless WebP 5000x5000 (was +318 MB)": lambda: lossless_webp(5000),
    "lossless WebP 2500x2500 (the WebP bound)": lambda: lossless_webp(2500),
    "RLE8 BMP 5000x5000, one pixel a row (was seconds)": lambda: rle8_bmp(5000, 5000),
    "RLE8 BMP 1000x1000, one pixel a row (the RLE bound)": lambda: rle8_bmp(1000, 1000),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="benchmarks/results/decode_memory.json")
    p.add_argument("--only", default="", help="run only the cases whose name contains this text")
    args = p.parse_args()
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in CASES.items():
            if args.only.lower() not in name.lower():
                continue
            data = make()
            for mode, size in (("L", 28), ("RGB", 84)):
                peak_mb, seconds, cpu_s, outcome = decode_costs(data, tmp, mode, size)
                rows.append({"image": name, "bytes": len(data), "model_input": f"{mode} {size}x{size}",
                             "peak_mb": peak_mb, "seconds": seconds, "cpu_s": cpu_s, "outcome": outcome})
    print("| image | bytes | model input | outcome | peak +MB | wall s | CPU s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['image']} | {r['bytes']:,} | {r['model_input']} | {r['outcome']} | {r['peak_mb']:.1f} | "
              f"{r['seconds']:.3f} | {r['cpu_s']:.3f} |")
    worst = max(r["peak_mb"] for r in rows)
    worst_cpu = max(r["cpu_s"] for r in rows)
    print(f"\nworst peak: +{worst:.1f} MB (target <= 200 MB: {'met' if worst <= 200 else 'MISSED'}); "
          f"worst CPU: {worst_cpu:.2f} s (target <= 2 s: {'met' if worst_cpu <= 2 else 'MISSED'})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "worst_peak_mb": worst, "worst_cpu_s": worst_cpu,
                               "command": "python benchmarks/bench_decode_memory.py" + (
                                   f" --only {args.only!r}" if args.only else ""), "torch": torch.__version__,
                               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                               "cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                               "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
