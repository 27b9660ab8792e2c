"""A live check of a bundle: start the real service on loopback, teach classes, classify, stop.

Used at the end of `fewshot pipeline`: it proves the exported bundle answers real HTTP requests.
"""

from __future__ import annotations

import io
import secrets
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _png(image_u8: np.ndarray) -> bytes:
    """uint8 (C, H, W) -> PNG bytes."""
    arr = image_u8[0] if image_u8.shape[0] == 1 else image_u8.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def service_smoke_check(
    bundle_dir: Path, images_by_class: dict[str, np.ndarray], *, shots: int = 5, timeout_s: float = 60.0
) -> dict[str, Any]:
    """Teach each class `shots` images over HTTP, classify the rest; returns accuracy and latencies."""
    import httpx
    import uvicorn

    from fewshot.service.app import create_app
    from fewshot.service.settings import ServiceSettings

    admin = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory() as tmp:
        settings = ServiceSettings(bundle_path=str(bundle_dir), db_url=str(Path(tmp) / "smoke.db"), admin_key=admin)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=base, timeout=30) as client:
                deadline = time.monotonic() + timeout_s
                while True:
                    try:
                        if client.get("/readyz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"service at {base} did not become ready in {timeout_s} s")
                    time.sleep(0.1)
                r = client.post("/workspaces", json={"name": "smoke"}, headers={"Authorization": f"Bearer {admin}"})
                r.raise_for_status()
                ws, key = r.json()["id"], r.json()["api_key"]
                auth = {"Authorization": f"Bearer {key}"}
                for label, imgs in images_by_class.items():
                    files = [("images", (f"{label}-{i}.png", _png(im), "image/png")) for i, im in enumerate(imgs[:shots])]
                    client.post(f"/workspaces/{ws}/classes", data={"label": label}, files=files, headers=auth).raise_for_status()
                correct, top1, rejected, total, latencies = 0, 0, 0, 0, []
                for label, imgs in images_by_class.items():
                    for i, im in enumerate(imgs[shots:]):
                        t0 = time.perf_counter()
                        r = client.post(f"/workspaces/{ws}/classify", files=[("images", (f"q{i}.png", _png(im), "image/png"))],
                                        headers=auth)
                        latencies.append(1000 * (time.perf_counter() - t0))
                        r.raise_for_status()
                        pred = r.json()["predictions"][0]
                        correct += int(pred["label"] == label)
                        top1 += int(bool(pred["top_k"]) and pred["top_k"][0]["label"] == label)
                        rejected += int(not pred["known"])
                        total += 1
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    return {
        "classes": len(images_by_class),
        "shots": shots,
        "queries": total,
        "accuracy": round(correct / max(1, total), 4),  # "unknown" counts as wrong
        "top1_accuracy_ignoring_unknown": round(top1 / max(1, total), 4),
        "rejected_as_unknown": round(rejected / max(1, total), 4),
        "classify_median_ms": round(statistics.median(latencies), 2) if latencies else None,
        "url": base,
    }
