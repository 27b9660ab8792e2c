"""Recogniser service latency and throughput against a real uvicorn server on loopback.

Measures (targets from the Deployment issue):
  * register a 5-image class: median server-side ms (target <= 15 ms)
  * classify one image with 16 concurrent clients: median and p99 (targets <= 5 ms, <= 20 ms),
    both closed-loop (each client sends as fast as it gets answers: saturation) and paced (each
    client sends at a fixed rate below saturation); client-observed and server-side (Server-Timing)
  * throughput with batching (images per request)
  * ONNX Runtime vs PyTorch eager embedding throughput at batch 1 (target ORT >= 2x)
  * classify time with 10 / 1,000 / 10,000 classes in a workspace
  * --throughput (issue 16): one-image classify, closed loop and paced, for several servers side by
    side in one run: `--baseline COMMIT` (that commit's service, run from `git archive`, on
    asyncio's loop as before uvloop was a dependency) and the working tree's with each of
    `--workers`; requests/s, client and server p50/p99, and the server's CPU ms per request (all its
    processes; the number that does not depend on what else the machine runs); with `--paired REPS`
    the baseline and this tree run at once, on the same loop and workers, their closed-loop phases
    alternated REPS times (the comparison that holds on a machine whose load drifts)
  * --memory (issue 16 #1): the server's RSS when idle, at its peak under C concurrent classify
    requests of N photos each (224x224 RGB model), and 10 s after they end; a bystander's one-image
    classify latency meanwhile; statuses (503 busy + Retry-After is an allowed answer)

Loopback only; every phase is bounded by a request count and a duration. Prints markdown tables
and writes the raw numbers to --out (JSON).

    python benchmarks/bench_service.py [--bundle DIR] [--out benchmarks/results/service.json]
    python benchmarks/bench_service.py --memory [--bundle RGB_BUNDLE] [--clients 8] [--images 64]
    python benchmarks/bench_service.py --throughput [--baseline 0b25161] [--workers 1 2] [--max-seconds 20]
    python benchmarks/bench_service.py --throughput --baseline COMMIT --paired 5 --workers 2 --max-seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ADMIN = "bench-admin-" + uuid.uuid4().hex


# -- fixtures ------------------------------------------------------------------------------------
def make_bundle(out: Path) -> Path:
    """Untrained Conv-4 (28x28 grayscale, seeded): latency does not depend on the weights."""
    import torch

    from fewshot.artifacts import export_bundle
    from fewshot.backbones import create_backbone
    from fewshot.data.imageio import Preprocessing

    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_channels=1, image_size=28)
    samples = np.random.default_rng(0).integers(0, 256, (8, 1, 28, 28), dtype=np.uint8)
    return export_bundle(backbone, out, preprocessing=Preprocessing("L", 28), source={"run": "bench"},
                         metrics={}, data_fingerprint="synthetic", calibration=None, sample_images=samples)


def png(seed: int, size: int = 105) -> bytes:
    """An Omniglot-sized (105x105) 1-bit-looking PNG."""
    arr = (np.random.default_rng(seed).random((size, size)) > 0.8).astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def multipart(images: list[bytes], fields: dict[str, str] | None = None, file_field: str = "images") -> tuple[bytes, str]:
    boundary = "bench" + uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in (fields or {}).items()]
    for i, img in enumerate(images):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{i}.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + img + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- a minimal keep-alive HTTP/1.1 client (the load generator must stay cheaper than the server) ---
class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    def close(self) -> None:
        self.writer.close()


def raw_request(method: str, path: str, body: bytes = b"", content_type: str = "", key: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    return (head + "\r\n").encode() + body


def server_ms(headers: dict[str, str]) -> float:
    return float(headers["server-timing"].split("dur=")[1])


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


# -- phases --------------------------------------------------------------------------------------
async def create_workspace(port: int, name: str) -> tuple[str, str]:
    c = await Conn.open(port)
    body = json.dumps({"name": name}).encode()
    status, _, resp = await c.request(raw_request("POST", "/workspaces", body, "application/json", ADMIN))
    c.close()
    assert status == 201, resp
    d = json.loads(resp)
    return d["id"], d["api_key"]


async def bench_register(port: int, n: int) -> dict[str, Any]:
    ws, key = await create_workspace(port, "register")
    c = await Conn.open(port)
    client_ms, srv_ms = [], []
    for i in range(n):
        body, ctype = multipart([png(i * 10 + j) for j in range(5)], {"label": f"class-{i}"})
        t0 = time.perf_counter()
        status, h, resp = await c.request(raw_request("POST", f"/workspaces/{ws}/classes", body, ctype, key))
        client_ms.append((time.perf_counter() - t0) * 1000)
        assert status == 201, resp
        srv_ms.append(server_ms(h))
    c.close()
    return {"n": n, "server_median_ms": pct(srv_ms, 50), "server_p99_ms": pct(srv_ms, 99),
            "client_median_ms": pct(client_ms, 50), "client_p99_ms": pct(client_ms, 99)}


async def load(port: int, raw: bytes, clients: int, max_requests: int, max_seconds: float,
               interval_s: float = 0.0) -> dict[str, Any]:
    """`clients` keep-alive connections; closed loop, or paced at one request per `interval_s`."""
    conns = [await Conn.open(port) for _ in range(clients)]
    client_ms: list[float] = []
    srv_ms: list[float] = []
    errors = 0
    budget = {"left": max_requests}
    deadline = time.perf_counter() + max_seconds

    async def worker(k: int, c: Conn) -> None:
        nonlocal errors
        next_at = time.perf_counter() + (interval_s * k / clients)
        while budget["left"] > 0 and time.perf_counter() < deadline:
            budget["left"] -= 1
            if interval_s:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                next_at += interval_s
            t0 = time.perf_counter()
            status, h, _ = await c.request(raw)
            client_ms.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                errors += 1
            else:
                srv_ms.append(server_ms(h))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k, c) for k, c in enumerate(conns)))
    wall = time.perf_counter() - t0
    for c in conns:
        c.close()
    return {"clients": clients, "requests": len(client_ms), "errors": errors, "wall_s": wall,
            "requests_per_s": len(client_ms) / wall, "interval_s": interval_s,
            "client_median_ms": pct(client_ms, 50), "client_p99_ms": pct(client_ms, 99),
            "server_median_ms": pct(srv_ms, 50), "server_p99_ms": pct(srv_ms, 99)}


def fill_workspace(db: Path, ws: str, n_classes: int, dim: int, have: int) -> None:
    """Add classes straight into the server's store: the server picks them up by the version counter."""
    from fewshot.service.store import NewExample, SQLiteStore

    store = SQLiteStore(db)
    rng = np.random.default_rng(n_classes)
    thumb = png(0, 16)
    for i in range(have, n_classes):
        store.add_class(ws, f"c{i}", [NewExample(rng.standard_normal(dim).astype(np.float32), thumb)])
    store.close()


async def bench_class_counts(port: int, db: Path, dim: int, counts: list[int], n: int) -> list[dict[str, Any]]:
    ws, key = await create_workspace(port, "scale")
    body, ctype = multipart([png(999)], {"top_k": "5"})
    raw = raw_request("POST", f"/workspaces/{ws}/classify", body, ctype, key)
    rows, have = [], 0
    for k in counts:
        fill_workspace(db, ws, k, dim, have)
        have = k
        c = await Conn.open(port)
        await c.request(raw)  # first call after the change re-syncs the new classes
        client_ms, srv_ms = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            status, h, _ = await c.request(raw)
            client_ms.append((time.perf_counter() - t0) * 1000)
            srv_ms.append(server_ms(h))
            assert status == 200
        c.close()
        rows.append({"classes": k, "server_median_ms": pct(srv_ms, 50), "server_p99_ms": pct(srv_ms, 99),
                     "client_median_ms": pct(client_ms, 50)})
    return rows


def bench_runtimes(bundle_dir: Path, seconds: float) -> list[dict[str, Any]]:
    """Embedding throughput at batch 1: ONNX Runtime vs eager PyTorch with the same thread count."""
    import torch

    from fewshot.artifacts import load_bundle

    x = np.random.default_rng(0).integers(0, 256, (1, 1, 28, 28), dtype=np.uint8)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        b = load_bundle(bundle_dir, intra_op_threads=threads)
        row: dict[str, Any] = {"threads": threads}
        for name, emb in (("onnxruntime", b.onnx_embedder), ("pytorch_eager", b.torch_embedder)):
            for _ in range(20):
                emb.embed(x)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                emb.embed(x)
                n += 1
            row[name] = n / (time.perf_counter() - t0)
        row["speedup"] = row["onnxruntime"] / row["pytorch_eager"]
        rows.append(row)
    return rows


# -- server --------------------------------------------------------------------------------------
def start_server(bundle: Path, db: Path, port: int, workers: int, *, src: Path | None = None,
                 no_uvloop: bool = False) -> subprocess.Popen[bytes]:
    """`fewshot serve` in a subprocess; `src`: run that copy of the package (a baseline commit's);
    `no_uvloop`: as if uvloop were not installed (uvicorn then runs asyncio's loop)."""
    code = (("import sys; sys.modules['uvloop'] = None; " if no_uvloop else "import sys; ") +
            "from fewshot.service.app import serve; "
            "serve(sys.argv[1], sys.argv[2], '127.0.0.1', int(sys.argv[3]), workers=int(sys.argv[4]), log_level='warning')")
    env = {**os.environ, "FEWSHOT_ADMIN_KEY": ADMIN, "FEWSHOT_MAX_IMAGES_PER_REQUEST": "256"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    proc = subprocess.Popen([sys.executable, "-c", code, str(bundle), str(db), str(port), str(workers)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready in 120 s")


async def run_http(args: argparse.Namespace, port: int, db: Path, dim: int) -> dict[str, Any]:
    res: dict[str, Any] = {"register": await bench_register(port, args.register_n)}
    ws, key = await create_workspace(port, "classify")
    c = await Conn.open(port)
    for i in range(20):  # a realistic small workspace: 20 classes of 5 images
        body, ctype = multipart([png(1000 + i * 5 + j) for j in range(5)], {"label": f"k{i}"})
        await c.request(raw_request("POST", f"/workspaces/{ws}/classes", body, ctype, key))
    c.close()
    body, ctype = multipart([png(5)], {"top_k": "5"})
    one = raw_request("POST", f"/workspaces/{ws}/classify", body, ctype, key)
    await load(port, one, 4, 200, 5)  # warm-up
    res["classify_closed_loop"] = await load(port, one, args.clients, args.max_requests, args.max_seconds)
    res["classify_paced"] = await load(port, one, args.clients, args.max_requests, args.max_seconds,
                                       interval_s=args.clients / args.paced_rps)
    batches = []
    for bs in (1, 8, 32, 128):
        body, ctype = multipart([png(j) for j in range(bs)], {"top_k": "1"})
        r = await load(port, raw_request("POST", f"/workspaces/{ws}/classify", body, ctype, key), 4,
                       max(20, args.max_requests // bs), args.max_seconds / 2)
        batches.append({"batch": bs, "images_per_s": r["requests_per_s"] * bs, **r})
    res["batching"] = batches
    res["class_counts"] = await bench_class_counts(port, db, dim, [10, 1000, 10000], args.scale_n)
    return res


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` and its children now alive (uvicorn's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def run_throughput_phase(args: argparse.Namespace, port: int, pid: int) -> dict[str, Any]:
    one = await _classify_request(port, "throughput", warm_up_s=5)
    c0 = cpu_s(pid)
    closed = await load(port, one, args.clients, args.max_requests, args.max_seconds)
    closed["server_cpu_ms_per_request"] = 1000 * (cpu_s(pid) - c0) / max(1, closed["requests"])
    c0 = cpu_s(pid)
    paced = await load(port, one, args.clients, args.max_requests, args.max_seconds, interval_s=args.clients / args.paced_rps)
    paced["server_cpu_ms_per_request"] = 1000 * (cpu_s(pid) - c0) / max(1, paced["requests"])
    return {"closed_loop": closed, "paced": paced}


def baseline_bundle(tmp: Path, src_dir: Path) -> Path:
    """The benchmark's model (same seed, same weights), exported by a baseline commit's own code, so an
    older server reads a manifest it knows."""
    served = tmp / "baseline-bundle"
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; " \
           f"from bench_service import make_bundle; make_bundle(Path({str(served)!r}))"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(src_dir)})
    return served


def main_throughput(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fewshot-bench-") as tmp:
        bundle = args.bundle or make_bundle(Path(tmp) / "bundle")
        servers: list[tuple[str, Path | None, bool, int]] = []
        if args.baseline:
            src = Path(tmp) / "baseline"
            src.mkdir()
            archive = subprocess.run(["git", "archive", args.baseline, "src"], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
            servers.append((f"{args.baseline} (asyncio loop, 1 worker)", src / "src", True, 1))
        servers += [(f"this tree ({w} worker{'s' if w > 1 else ''})", None, False, w) for w in args.workers]
        for name, src_dir, no_uvloop, workers in servers:
            port, served = free_port(), bundle
            if src_dir is not None and args.bundle is None:  # the same model, exported by the baseline's code
                served = baseline_bundle(Path(tmp), src_dir)
            proc = start_server(served, Path(tmp) / f"{len(rows)}.db", port, workers, src=src_dir, no_uvloop=no_uvloop)
            try:
                r = asyncio.run(run_throughput_phase(args, port, proc.pid))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            rows.append({"server": name, "workers": workers, **r})
            print(f"{name}: {r['closed_loop']['requests_per_s']:.0f} requests/s", flush=True)
    out = {"rows": rows, "command": "python benchmarks/bench_service.py " + " ".join(sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "loadavg_1m_after": os.getloadavg()[0], "platform": platform.platform()},
           "args": {k: str(v) for k, v in vars(args).items()}}
    print(table(["server", "phase", "requests", "req/s", "client p50 ms", "client p99 ms", "server p50 ms",
                 "server p99 ms", "server CPU ms/request"],
                [[r["server"], phase, p["requests"], p["requests_per_s"], p["client_median_ms"], p["client_p99_ms"],
                  p["server_median_ms"], p["server_p99_ms"], p["server_cpu_ms_per_request"]]
                 for r in rows for phase, p in (("closed loop", r["closed_loop"]), ("paced", r["paced"]))]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"\nraw numbers: {args.out}")


def main_paired(args: argparse.Namespace) -> None:
    """--paired REPS: the baseline commit's service and this tree's, each with --workers[0] workers
    on uvloop, serving the same model at once (each exported by its own commit's code unless --bundle);
    a closed-loop phase and a paced phase (--paced-rps) of --max-seconds each alternate between them
    REPS times, so drifting load on the machine hits both alike. Medians over the phases."""
    if not args.baseline:
        raise SystemExit("--paired needs --baseline COMMIT")
    workers = args.workers[0]
    phases: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="fewshot-bench-") as tmp:
        bundle = args.bundle or make_bundle(Path(tmp) / "bundle")
        src = Path(tmp) / "baseline"
        src.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline, "src"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        names = [f"{args.baseline} (baseline)", "this tree"]
        servers: list[tuple[str, int, subprocess.Popen[bytes]]] = []
        try:
            for name, src_dir in zip(names, (src / "src", None)):
                port = free_port()
                served = bundle if src_dir is None or args.bundle else baseline_bundle(Path(tmp), src_dir)
                servers.append((name, port, start_server(served, Path(tmp) / f"{len(servers)}.db", port, workers,
                                                         src=src_dir)))
            requests = {name: asyncio.run(_classify_request(port, "paired", warm_up_s=2)) for name, port, _ in servers}
            for _ in range(args.paired):
                for name, port, proc in servers:
                    for phase, interval in (("closed loop", 0.0), ("paced", args.clients / args.paced_rps)):
                        c0 = cpu_s(proc.pid)
                        r = asyncio.run(load(port, requests[name], args.clients, args.max_requests, args.max_seconds,
                                             interval_s=interval))
                        r["server_cpu_ms_per_request"] = 1000 * (cpu_s(proc.pid) - c0) / max(1, r["requests"])
                        phases.setdefault(f"{name} | {phase}", []).append(r)
        finally:
            for _, _, proc in servers:
                proc.terminate()
                proc.wait(timeout=30)
    keys = ("requests_per_s", "client_median_ms", "client_p99_ms", "server_median_ms", "server_p99_ms",
            "server_cpu_ms_per_request")
    med = {name: {k: float(np.median([r[k] for r in rs])) for k in keys} for name, rs in phases.items()}
    print(table(["server", "phase", "workers", "phases", "req/s (median)", "req/s (each phase)", "client p50 / p99 ms",
                 "server p50 / p99 ms", "server CPU ms/request"],
                [[*name.split(" | "), workers, len(phases[name]), f"{m['requests_per_s']:.0f}",
                  " ".join(f"{r['requests_per_s']:.0f}" for r in phases[name]),
                  f"{m['client_median_ms']:.1f} / {m['client_p99_ms']:.1f}",
                  f"{m['server_median_ms']:.1f} / {m['server_p99_ms']:.1f}", f"{m['server_cpu_ms_per_request']:.2f}"]
                 for name, m in med.items()]))
    out = {"medians": med, "phases": phases, "workers": workers,
           "command": "python benchmarks/bench_service.py " + " ".join(sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "loadavg_1m_after": os.getloadavg()[0], "platform": platform.platform()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"\nraw numbers: {args.out}")


async def _classify_request(port: int, name: str, *, warm_up_s: float) -> bytes:
    """A workspace of 20 classes x 5 images on the server at `port`, warmed up; the raw one-image
    classify request for it."""
    ws, key = await create_workspace(port, name)
    c = await Conn.open(port)
    for i in range(20):
        body, ctype = multipart([png(1000 + i * 5 + j) for j in range(5)], {"label": f"k{i}"})
        status, _, text = await c.request(raw_request("POST", f"/workspaces/{ws}/classes", body, ctype, key))
        assert status == 201, text
    c.close()
    body, ctype = multipart([png(5)], {"top_k": "5"})
    one = raw_request("POST", f"/workspaces/{ws}/classify", body, ctype, key)
    await load(port, one, 4, 200, warm_up_s)  # warm-up
    return one


def make_photo_bundle(out: Path, hidden: int = 32) -> Path:
    """Untrained Conv-4 on 224x224 RGB (the photos model's input size): memory follows the input size."""
    import torch

    from fewshot.artifacts import export_bundle
    from fewshot.backbones import create_backbone
    from fewshot.data.imageio import Preprocessing

    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_channels=3, image_size=224, hidden=hidden)
    samples = np.random.default_rng(0).integers(0, 256, (4, 3, 224, 224), dtype=np.uint8)
    pre = Preprocessing("RGB", 224, resample="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return export_bundle(backbone, out, preprocessing=pre, source={"name": "photos"}, metrics={},
                         data_fingerprint="synthetic", calibration=None, sample_images=samples)


def photo(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run_memory(args: argparse.Namespace, port: int, pid: int) -> dict[str, Any]:
    ws, key = await create_workspace(port, "memory")
    c = await Conn.open(port)
    for i in range(3):
        body, ctype = multipart([photo(100 + i * 5 + j) for j in range(5)], {"label": f"k{i}"})
        status, _, text = await c.request(raw_request("POST", f"/workspaces/{ws}/classes", body, ctype, key))
        assert status == 201, text
    body, ctype = multipart([photo(7)], {"top_k": "1"})
    one = raw_request("POST", f"/workspaces/{ws}/classify", body, ctype, key)
    await c.request(one)
    await asyncio.sleep(1.0)
    idle = rss_mb(pid)
    body, ctype = multipart([photo(1000 + j) for j in range(args.images)], {"top_k": "1"})
    big = raw_request("POST", f"/workspaces/{ws}/classify", body, ctype, key)
    statuses: dict[str, int] = {}
    peak, done = idle, False
    bystander: list[float] = []

    async def client() -> None:
        conn = await Conn.open(port)
        status, headers, _ = await conn.request(big)
        key_ = f"{status}" + (" (Retry-After)" if status == 503 and "retry-after" in headers else "")
        statuses[key_] = statuses.get(key_, 0) + 1
        conn.close()

    async def watch() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.05)

    async def bystand() -> None:
        conn = await Conn.open(port)
        while not done:
            t0 = time.perf_counter()
            await conn.request(one)
            bystander.append((time.perf_counter() - t0) * 1000)
        conn.close()

    t0 = time.perf_counter()
    watcher, by = asyncio.create_task(watch()), asyncio.create_task(bystand())
    await asyncio.gather(*(client() for _ in range(args.clients)))
    wall = time.perf_counter() - t0
    done = True
    await watcher
    await by
    await asyncio.sleep(10.0)
    after = rss_mb(pid)
    return {"clients": args.clients, "images_per_request": args.images, "idle_rss_mb": idle, "peak_rss_mb": peak,
            "rss_10s_after_mb": after, "peak_over_idle_mb": peak - idle, "after_over_idle_mb": after - idle,
            "statuses": statuses, "wall_s": wall, "bystander_ms_p50": pct(bystander, 50),
            "bystander_ms_max": max(bystander) if bystander else float("nan"), "bystander_requests": len(bystander)}


def table(headers: list[str], rows: list[list[Any]]) -> str:
    fmt = [f"{v:.2f}" if isinstance(v, float) else str(v) for r in rows for v in r]
    cells = [fmt[i * len(headers):(i + 1) * len(headers)] for i in range(len(rows))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def report(r: dict[str, Any]) -> str:
    reg, cl, pa, rt = r["register"], r["classify_closed_loop"], r["classify_paced"], r["runtimes"]
    out = [f"## Service benchmark ({r['machine']['cpus']} CPUs, {r['machine']['workers']} worker(s))", "",
           table(["phase", "requests", "req/s", "client median ms", "client p99 ms", "server median ms",
                  "server p99 ms"], [
               ["register 5-image class (1 client)", reg["n"], float("nan"), reg["client_median_ms"],
                reg["client_p99_ms"], reg["server_median_ms"], reg["server_p99_ms"]],
               [f"classify 1 image, {cl['clients']} clients closed loop", cl["requests"], cl["requests_per_s"],
                cl["client_median_ms"], cl["client_p99_ms"], cl["server_median_ms"], cl["server_p99_ms"]],
               [f"classify 1 image, {pa['clients']} clients paced", pa["requests"], pa["requests_per_s"],
                pa["client_median_ms"], pa["client_p99_ms"], pa["server_median_ms"], pa["server_p99_ms"]]]),
           "", table(["images/request", "images/s", "server median ms/request"],
                     [[b["batch"], b["images_per_s"], b["server_median_ms"]] for b in r["batching"]]),
           "", table(["threads", "ONNX Runtime embeddings/s (batch 1)", "PyTorch eager embeddings/s", "ORT speedup"],
                     [[x["threads"], x["onnxruntime"], x["pytorch_eager"], x["speedup"]] for x in rt]),
           "", table(["classes in workspace", "server median ms", "server p99 ms", "client median ms"],
                     [[c["classes"], c["server_median_ms"], c["server_p99_ms"], c["client_median_ms"]]
                      for c in r["class_counts"]])]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="bundle directory (default: an untrained Conv-4 made here)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/service.json"))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-requests", type=int, default=3000)
    p.add_argument("--max-seconds", type=float, default=20.0)
    p.add_argument("--paced-rps", type=float, default=160.0, help="total request rate of the paced phase")
    p.add_argument("--register-n", type=int, default=100)
    p.add_argument("--scale-n", type=int, default=200)
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="uvicorn worker processes (--throughput: "
                   "one server per value)")
    p.add_argument("--memory", action="store_true", help="only the memory phase (issue 16 #1)")
    p.add_argument("--throughput", action="store_true", help="only one-image classify, servers side by side")
    p.add_argument("--baseline", help="--throughput: also serve this git commit's service, first")
    p.add_argument("--images", type=int, default=64, help="--memory: images per request")
    p.add_argument("--paired", type=int, default=0, metavar="REPS",
                   help="--throughput --baseline C: both servers up at once (same loop, same --workers), closed-loop "
                        "and paced phases alternated REPS times; the fair comparison on a machine whose load drifts")
    args = p.parse_args(argv)
    if args.memory:
        main_memory(args)
        return
    if args.throughput:
        if args.out == Path("benchmarks/results/service.json"):
            args.out = Path("benchmarks/results/service_throughput.json")
        (main_paired if args.paired else main_throughput)(args)
        return
    args.workers = args.workers[0]
    with tempfile.TemporaryDirectory(prefix="fewshot-bench-") as tmp:
        bundle = args.bundle or make_bundle(Path(tmp) / "bundle")
        from fewshot.artifacts.bundle import Manifest

        dim = Manifest.from_json((bundle / "manifest.json").read_text(), where=str(bundle)).embedding_dim
        db, port = Path(tmp) / "bench.db", free_port()
        proc = start_server(bundle, db, port, args.workers)
        try:
            results = asyncio.run(run_http(args, port, db, dim))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        results["runtimes"] = bench_runtimes(bundle, seconds=3.0)
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "workers": args.workers,
                          "loadavg_1m_after": os.getloadavg()[0],
                          "platform": platform.platform()}
    results["args"] = {k: str(v) for k, v in vars(args).items()}
    print(report(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nraw numbers: {args.out}")


def main_memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="fewshot-bench-") as tmp:
        bundle = args.bundle or make_photo_bundle(Path(tmp) / "photos")
        port = free_port()
        proc = start_server(bundle, Path(tmp) / "memory.db", port, 1)
        try:
            r = asyncio.run(run_memory(args, port, proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    r["command"] = "python benchmarks/bench_service.py --memory " + " ".join(
        f"--{k} {v}" for k, v in (("clients", args.clients), ("images", args.images)))
    r["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_1m_after": os.getloadavg()[0]}
    print(table(["clients x images", "idle MB", "peak MB", "10 s after MB", "statuses", "bystander p50 / max ms"],
                [[f"{r['clients']} x {r['images_per_request']}", r["idle_rss_mb"], r["peak_rss_mb"],
                  r["rss_10s_after_mb"], json.dumps(r["statuses"]),
                  f"{r['bystander_ms_p50']:.0f} / {r['bystander_ms_max']:.0f}"]]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2))
    print(f"\nraw numbers: {args.out}")


if __name__ == "__main__":
    main()
