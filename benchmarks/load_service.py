"""Load on the recogniser service, with proof that nothing acknowledged was lost.

N concurrent keep-alive clients (default 32) for T seconds (default 120) mix classify (1 image)
and register (a new class of 3 images, or 1-2 images added to a class) over several workspaces,
against real server processes on loopback:

  * sqlite:   one service process on an SQLite file;
  * postgres: `--replicas` processes (default 2) sharing one PostgreSQL database (a throwaway
              server started here, or `--db postgresql://...`); each client talks to one replica,
              so classes made on one are extended and classified on the other. Replicas learn of
              each other's changes by LISTEN/NOTIFY;
  * postgres-polling: the same with FEWSHOT_STORE_NOTIFICATIONS=0 (a version read per request);
  * replicas: postgres, then postgres-polling;
  * photos: one process on an SQLite file serving `--bundle` (the photos model: 224x224 RGB), with
            colour JPEG uploads and every route that embeds or scores mixed in (`--mix`: classify,
            explain, occlusion at `--occlusion-cells`, insight, register). Reported besides: the
            server's peak RSS, and errors other than 503 / 429 with Retry-After (the answers a
            bounded server may give: "busy, retry").

For the PostgreSQL scenarios each replica's /metrics is read before and after the load: workspace
version reads (`fewshot_store_version_reads_total`) per request, and notifications received.

Afterwards, with the servers still up: every acknowledged registration (class id, label, at least
its acknowledged examples, at most those plus the images of unanswered requests) must be in the
store, read through every replica's API and straight from the database; and every replica's
in-memory prototypes must equal a fresh recogniser's built from the store (classify scores of
probe images compared).

`--pg-restart` stops PostgreSQL (`pg_ctl stop -m fast|immediate`) a third of the way in for
`--pg-down-s` seconds and starts it again; reported: 5xx by status, the 503 window and the time to
recovery (first acknowledged registration and last failed request after the database was back).

Loopback only; bounded by --duration and --max-requests. Prints markdown tables; writes raw
numbers to --out (JSON) with the torch version, machine and date.

    python benchmarks/load_service.py                                   # both, 32 clients, 120 s each
    python benchmarks/load_service.py --scenario sqlite --duration 10
    python benchmarks/load_service.py --scenario postgres --replicas 2 --db postgresql://u:p@host/db
    python benchmarks/load_service.py --scenario postgres --pg-restart --duration 30
    python benchmarks/load_service.py --scenario replicas --duration 60 --out benchmarks/results/load_replicas.json
    python benchmarks/load_service.py --scenario photos --bundle PHOTOS_BUNDLE --out benchmarks/results/load_photos.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "service")]

from bench_service import Conn, make_bundle, multipart, pct, png, raw_request, rss_mb, table  # noqa: E402
from fault_helpers import ADMIN, Ledger, PgCluster, ServiceProcess  # noqa: E402
from postgres_server import find_pg_bin  # noqa: E402


# -- one request, timed ---------------------------------------------------------------------------
@dataclass
class Sample:
    kind: str  # "classify" | "create" | "add" | "explain" | "occlusion" | "insight"
    t_s: float  # when it was sent, seconds since the load started
    status: int  # 0: no answer (connection refused/reset, timeout)
    client_ms: float
    server_ms: float | None  # Server-Timing app;dur
    replica: int
    body: str = ""  # kept for non-2xx only
    retry_after: bool = False  # the answer carried Retry-After

    @property
    def error(self) -> bool:
        """Neither 2xx nor "busy, retry" (503 / 429 with Retry-After)."""
        return not (200 <= self.status < 300 or (self.status in (503, 429) and self.retry_after))


@dataclass
class Workspace:
    id: str
    key: str
    classes: list[str] = field(default_factory=list)  # acknowledged class ids


class Client:
    """One keep-alive connection that reconnects after an error or `Connection: close`."""

    def __init__(self, port: int, timeout_s: float) -> None:
        self.port, self.timeout_s = port, timeout_s
        self.conn: Conn | None = None

    async def send(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        try:
            if self.conn is None:
                self.conn = await asyncio.wait_for(Conn.open(self.port), self.timeout_s)
            status, headers, body = await asyncio.wait_for(self.conn.request(raw), self.timeout_s)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
            self.close()
            await asyncio.sleep(0.05)  # the server is gone or stuck: do not spin
            return 0, {}, b""
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _server_ms(headers: dict[str, str]) -> float | None:
    st = headers.get("server-timing", "")
    return float(st.split("dur=")[1].split(",")[0]) if "dur=" in st else None


# -- the load --------------------------------------------------------------------------------------
class Load:
    def __init__(self, args: argparse.Namespace, ports: Sequence[int], workspaces: list[Workspace],
                 ledger: Ledger) -> None:
        self.args, self.ports, self.workspaces, self.ledger = args, list(ports), workspaces, ledger
        self.samples: list[Sample] = []
        self.budget = args.max_requests
        self.image = photo_jpeg if args.photos else (lambda seed: png(seed, 28))
        self.images = [self.image(10_000 + i) for i in range(256 if not args.photos else 64)]
        self.probe_bodies = [multipart([self.images[i]], {"top_k": "3"}) for i in range(32)]
        self.single = [multipart([self.images[i]], file_field="image") for i in range(32)]
        self.occlusion = [multipart([self.images[i]], {"cells": str(args.occlusion_cells)}, file_field="image")
                          for i in range(8)]
        self.mix = mix_of(args)
        self.t0 = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def run(self, duration_s: float) -> float:
        self.t0 = time.perf_counter()
        deadline = self.t0 + duration_s
        await asyncio.gather(*(self.client(k, deadline) for k in range(self.args.clients)))
        return time.perf_counter() - self.t0

    async def client(self, k: int, deadline: float) -> None:
        rng = np.random.default_rng(k)
        replica = k % len(self.ports)
        c = Client(self.ports[replica], self.args.request_timeout)
        n = 0
        while self.budget > 0 and time.perf_counter() < deadline:
            self.budget -= 1
            n += 1
            ws = self.workspaces[int(rng.integers(len(self.workspaces)))]
            kind = str(rng.choice(list(self.mix), p=list(self.mix.values())))
            if kind == "classify":
                body, ctype = self.probe_bodies[int(rng.integers(len(self.probe_bodies)))]
                await self.call(c, replica, "classify", raw_request("POST", f"/workspaces/{ws.id}/classify", body, ctype, ws.key))
            elif kind in ("explain", "occlusion"):
                bodies = self.single if kind == "explain" else self.occlusion
                body, ctype = bodies[int(rng.integers(len(bodies)))]
                await self.call(c, replica, kind, raw_request("POST", f"/workspaces/{ws.id}/{kind}", body, ctype, ws.key))
            elif kind == "insight":
                await self.call(c, replica, "insight", raw_request("GET", f"/workspaces/{ws.id}/insight", key=ws.key))
            elif not ws.classes or rng.random() < self.args.new_class_share:
                label = f"L-{k}-{n}-{uuid.uuid4().hex[:4]}"
                imgs = [self.images[int(i)] for i in rng.integers(len(self.images), size=3)]
                body, ctype = multipart(imgs, {"label": label})
                status, resp = await self.call(c, replica, "create",
                                               raw_request("POST", f"/workspaces/{ws.id}/classes", body, ctype, ws.key))
                with self.ledger.lock:
                    if 200 <= status < 300:
                        cid = json.loads(resp)["id"]
                        self.ledger.labels[cid] = label
                        self.ledger.acked[cid] += 3
                        ws.classes.append(cid)
                    elif 400 <= status < 500:
                        self.ledger.refused_labels.add(label)
                    else:
                        self.ledger.maybe_labels[label] = 3
            else:
                cid = ws.classes[int(rng.integers(len(ws.classes)))]
                m = int(rng.integers(1, 3))
                body, ctype = multipart([self.images[int(i)] for i in rng.integers(len(self.images), size=m)])
                status, _ = await self.call(c, replica, "add",
                                            raw_request("POST", f"/workspaces/{ws.id}/classes/{cid}/images", body, ctype, ws.key))
                with self.ledger.lock:
                    if 200 <= status < 300:
                        self.ledger.acked[cid] += m
                    elif not 400 <= status < 500:
                        self.ledger.maybe_images[cid] += m
        c.close()

    async def call(self, c: Client, replica: int, kind: str, raw: bytes) -> tuple[int, bytes]:
        t = self.now()
        t0 = time.perf_counter()
        status, headers, body = await c.send(raw)
        ms = (time.perf_counter() - t0) * 1000
        keep = "" if 200 <= status < 300 else body[:300].decode(errors="replace")
        self.samples.append(Sample(kind, t, status, ms, _server_ms(headers), replica, keep, "retry-after" in headers))
        return status, body


async def _admin(port: int, method: str, path: str, key: str, body: bytes = b"", ctype: str = "") -> tuple[int, bytes]:
    c = Client(port, 60)
    status, _, resp = await c.send(raw_request(method, path, body, ctype, key))
    c.close()
    return status, resp


def photo_jpeg(seed: int, side: int = 160) -> bytes:
    """A colour 'photo': smooth gradients of random phase plus a little noise, as a JPEG."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    rgb = np.stack([np.sin(rng.uniform(2, 9) * x + rng.uniform(0, 6)), np.cos(rng.uniform(2, 9) * y + rng.uniform(0, 6)),
                    np.sin(rng.uniform(2, 9) * (x + y))], -1)
    arr = np.clip((rgb + 1) * 127.5 + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


MIX_KINDS = ("classify", "explain", "occlusion", "insight", "register")


def mix_of(args: argparse.Namespace) -> dict[str, float]:
    """Shares of each kind of request: --mix for the photos scenario, else classify / register."""
    if not args.photos:
        return {"classify": args.classify_share, "register": 1 - args.classify_share}
    mix = {k: float(v) for k, _, v in (part.partition("=") for part in args.mix.split(","))}
    if set(mix) - set(MIX_KINDS) or any(v < 0 for v in mix.values()) or not sum(mix.values()):
        raise SystemExit(f"--mix {args.mix!r}: give shares of {', '.join(MIX_KINDS)} as kind=share,...")
    return {k: v / sum(mix.values()) for k, v in mix.items()}


async def setup_workspaces(port: int, n: int, ledger: Ledger, image: Any = None) -> list[Workspace]:
    """`n` workspaces, each seeded with 3 acknowledged classes (classify needs one)."""
    out = []
    for w in range(n):
        status, resp = await _admin(port, "POST", "/workspaces", ADMIN, json.dumps({"name": f"load-{w}"}).encode(),
                                    "application/json")
        assert status == 201, resp
        ws = Workspace(json.loads(resp)["id"], json.loads(resp)["api_key"])
        for i in range(3):
            label = f"L-seed-{w}-{i}"
            body, ctype = multipart([(image or (lambda seed: png(seed, 28)))(w * 100 + i * 10 + j) for j in range(3)],
                                    {"label": label})
            status, resp = await _admin(port, "POST", f"/workspaces/{ws.id}/classes", ws.key, body, ctype)
            assert status == 201, resp
            cid = json.loads(resp)["id"]
            ledger.labels[cid], ledger.acked[cid] = label, 3
            ws.classes.append(cid)
        out.append(ws)
    return out


# -- verification ----------------------------------------------------------------------------------
async def verify(args: argparse.Namespace, ports: Sequence[int], db_url: str, bundle: Path,
                 workspaces: list[Workspace], ledger: Ledger) -> dict[str, Any]:
    """Every acknowledged registration in the store (through each replica and directly), and each
    replica's prototypes equal to a fresh recogniser's."""
    from fewshot.service.store import open_store

    problems: list[str] = []
    direct: dict[str, tuple[str, int]] = {}
    store = open_store(db_url)
    try:
        for ws in workspaces:
            direct.update({c.id: (c.label, c.n_examples) for c in store.list_classes(ws.id)})
    finally:
        store.close()
    problems += [f"direct: {p}" for p in ledger.problems(direct)]
    for r, port in enumerate(ports):
        via_api: dict[str, tuple[str, int]] = {}
        for ws in workspaces:
            status, resp = await _admin(port, "GET", f"/workspaces/{ws.id}/classes", ws.key)
            if status != 200:
                problems.append(f"replica {r}: GET classes -> {status} {resp[:200]!r}")
                continue
            via_api.update({c["id"]: (c["label"], c["n_examples"]) for c in json.loads(resp)})
        if via_api != direct:
            diff = {k for k in set(via_api) | set(direct) if via_api.get(k) != direct.get(k)}
            problems.append(f"replica {r}: API and database disagree on {len(diff)} classes")
    proto = await prototype_check(args, ports, db_url, bundle, workspaces)
    problems += proto["problems"]
    return {"classes": len(direct), "examples": sum(n for _, n in direct.values()),
            "acked_classes": len(ledger.labels), "acked_examples": sum(ledger.acked.values()),
            "unknown_outcome_creations": len(ledger.maybe_labels),
            "unknown_outcome_images": sum(ledger.maybe_images.values()),
            "prototype_max_abs_diff": proto["max_abs_diff"], "problems": problems}


async def prototype_check(args: argparse.Namespace, ports: Sequence[int], db_url: str, bundle: Path,
                          workspaces: list[Workspace]) -> dict[str, Any]:
    """Classify 4 probes on each replica (top_k up to 100) and with a fresh recogniser over the
    same store; compare the scores class by class."""
    from fewshot.service.app import open_state
    from fewshot.service.images import decode_upload
    from fewshot.service.settings import ServiceSettings

    state = open_state(ServiceSettings(bundle_path=str(bundle), db_url=db_url))
    probes = [png(77_000 + i, 28) for i in range(4)]
    arr = np.stack([decode_upload(p, state.bundle.preprocessing, max_pixels=10**6, thumbnail_size=16, name="probe",
                                  thumbnail=False).array for p in probes])
    worst, problems = 0.0, []
    try:
        for ws in workspaces:
            fresh = state.recogniser.classify(ws.id, arr, top_k=100)
            want = [{c.class_id: c.score for c in p.top_k} for p in fresh]
            body, ctype = multipart(probes, {"top_k": "100"})
            for r, port in enumerate(ports):
                status, resp = await _admin(port, "POST", f"/workspaces/{ws.id}/classify", ws.key, body, ctype)
                if status != 200:
                    problems.append(f"replica {r}: probe classify -> {status} {resp[:200]!r}")
                    continue
                for p, w in zip(json.loads(resp)["predictions"], want):
                    got = {c["class_id"]: c["score"] for c in p["top_k"]}
                    common = set(got) & set(w)
                    diffs = [abs(got[c] - w[c]) / max(1.0, abs(w[c])) for c in common]
                    worst = max([worst, *diffs])
                    if len(common) < min(len(got), len(w)) // 2:
                        problems.append(f"replica {r}, {ws.id}: top-k classes differ from a fresh recogniser's")
    finally:
        state.store.close()
    if worst > args.prototype_tolerance:
        problems.append(f"in-memory prototypes differ from the store's: max relative score difference {worst:.3g}")
    return {"max_abs_diff": worst, "problems": problems}


async def store_counters(ports: Sequence[int]) -> list[dict[str, float]]:
    """Each replica's store counters from /metrics (version reads, notifications received)."""
    names = {"fewshot_store_version_reads_total": "version_reads", "fewshot_store_notifications_total": "notifications",
             "fewshot_store_listener_connects_total": "listener_connects"}
    out = []
    for port in ports:
        status, resp = await _admin(port, "GET", "/metrics", ADMIN)
        found: dict[str, float] = {}
        for line in resp.decode(errors="replace").splitlines() if status == 200 else []:
            name, _, value = line.partition(" ")
            if name in names:
                found[names[name]] = float(value)
        out.append(found)
    return out


def read_report(samples: list[Sample], before: list[dict[str, float]], after: list[dict[str, float]]) -> dict[str, Any]:
    """Version reads and notifications per replica during the load, against its requests."""
    per = []
    for r, (b, a) in enumerate(zip(before, after)):
        n = sum(s.replica == r for s in samples)
        delta = {k: a.get(k, 0.0) - b.get(k, 0.0) for k in ("version_reads", "notifications", "listener_connects")}
        per.append({"replica": r, "requests": n, **delta, "version_reads_per_request": delta["version_reads"] / max(n, 1)})
    reads, n = sum(p["version_reads"] for p in per), sum(p["requests"] for p in per)
    return {"replicas": per, "version_reads": reads, "requests": n, "version_reads_per_request": reads / max(n, 1),
            "notifications": sum(p["notifications"] for p in per)}


# -- reporting -------------------------------------------------------------------------------------
def summarise(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"requests": len(samples), "wall_s": wall_s, "requests_per_s": len(samples) / wall_s}
    by_kind = {"classify": ["classify"], "register": ["create", "add"], "explain": ["explain"],
               "occlusion": ["occlusion"], "insight": ["insight"]}
    for name, kinds in by_kind.items():
        ok = [s for s in samples if s.kind in kinds and 200 <= s.status < 300]
        srv = [s.server_ms for s in ok if s.server_ms is not None]
        out[name] = {"n": sum(s.kind in kinds for s in samples), "ok": len(ok),
                     "client_p50_ms": pct([s.client_ms for s in ok], 50), "client_p99_ms": pct([s.client_ms for s in ok], 99),
                     "server_p50_ms": pct(srv, 50), "server_p99_ms": pct(srv, 99),
                     "client_ms": [round(s.client_ms, 2) for s in ok], "server_ms": [round(x, 2) for x in srv]}
    out["status_counts"] = {f"{k} {st}": n for (k, st), n in sorted(Counter((s.kind, s.status) for s in samples).items())}
    out["error_samples"] = [{"kind": s.kind, "t_s": round(s.t_s, 3), "status": s.status, "body": s.body}
                            for s in samples if not 200 <= s.status < 300][:50]
    out["errors_other_than_busy"] = sum(s.error for s in samples)
    out["busy_with_retry_after"] = sum(s.status in (503, 429) and s.retry_after for s in samples)
    return out


RECOVERY_S = 5.0  # the contract: normal answers again within 5 s of the database returning


def restart_report(samples: list[Sample], marks: dict[str, Any], leaks: int) -> dict[str, Any]:
    """5xx by status, the 503 window and recovery (by when answers arrived), relative to the
    database stop / start. Verdict OK = the contract: only 503s (no other 5xx or 4xx, no dropped
    connection, no leaked connection details) and normal answers within RECOVERY_S of the
    database returning."""
    t_stop, t_up = marks["stop_issued_s"], marks["up_s"]

    def done(s: Sample) -> float:  # when the answer (or the failure) arrived
        return s.t_s + s.client_ms / 1000

    errors = [s for s in samples if not 200 <= s.status < 300 and not 400 <= s.status < 500]
    s503 = [done(s) for s in samples if s.status == 503]
    after_up = sorted((s for s in samples if done(s) >= t_up), key=done)
    first_ok_reg = next((done(s) for s in after_up if s.kind in ("create", "add") and 200 <= s.status < 300), None)
    last_err = max((done(s) for s in after_up if not 200 <= s.status < 300), default=None)
    non_2xx = Counter(str(s.status) for s in samples if not 200 <= s.status < 300)
    ok = (set(non_2xx) <= {"503"} and leaks == 0 and (last_err is None or last_err - t_up <= RECOVERY_S)
          and first_ok_reg is not None)
    return {**marks, "verdict": "OK" if ok else "FAIL", "responses_leaking_connection_details": leaks,
            "non_2xx_by_status": dict(non_2xx),
            "5xx_other_than_503": sum(s.status >= 500 and s.status != 503 for s in samples),
            "no_answer": sum(s.status == 0 for s in samples),
            "errors_total": len(errors),
            "window_503_s": [min(s503) - t_stop, max(s503) - t_up] if s503 else None,
            "first_ok_register_after_up_s": None if first_ok_reg is None else first_ok_reg - t_up,
            "last_error_after_up_s": None if last_err is None else last_err - t_up}


def report(results: dict[str, Any]) -> str:
    rows, checks, restarts, reads = [], [], [], []
    for sc in results["scenarios"]:
        s, v = sc["load"], sc["verify"]
        errors = ", ".join(f"{k}: {n}" for k, n in s["status_counts"].items() if not k.split()[1].startswith("2")) or "none"
        name = f"{sc['scenario']} x{sc['replicas']}" + (" + pg restart" if sc.get("restart") else "")
        if sc.get("store_reads"):
            r = sc["store_reads"]
            reads.append([name, "on" if sc["notifications"] else "off", r["requests"], int(r["version_reads"]),
                          f"{r['version_reads_per_request']:.4f}", int(r["notifications"]),
                          " / ".join(f"{p['version_reads_per_request']:.4f}" for p in r["replicas"])])
        for kind in ("classify", "register", "explain", "occlusion", "insight"):
            k = s[kind]
            if not k["n"]:
                continue
            rows.append([name, kind, k["n"], k["ok"], k["n"] / s["wall_s"], k["client_p50_ms"], k["client_p99_ms"],
                         k["server_p50_ms"], k["server_p99_ms"]])
        checks.append([name, s["requests"], errors, s["errors_other_than_busy"],
                       f"{v['acked_classes']} / {v['acked_examples']}",
                       f"{v['classes']} / {v['examples']}", f"{v['prototype_max_abs_diff']:.2g}",
                       "-" if "rss" not in sc else f"{sc['rss']['idle_mb']:.0f} / {sc['rss']['peak_mb']:.0f} / "
                       f"{sc['rss']['after_mb']:.0f}",
                       "OK" if not v["problems"] else f"{len(v['problems'])} problems"])
        if sc.get("restart"):
            r = sc["restart"]
            win = r["window_503_s"]
            restarts.append([name, r["stop_mode"], r["down_s"], r["5xx_other_than_503"], r["no_answer"],
                             json.dumps(r["non_2xx_by_status"]), r["responses_leaking_connection_details"],
                             "none" if win is None else f"stop{win[0]:+.2f} s .. up{win[1]:+.2f} s",
                             "-" if r["first_ok_register_after_up_s"] is None else f"{r['first_ok_register_after_up_s']:.2f}",
                             "-" if r["last_error_after_up_s"] is None else f"{r['last_error_after_up_s']:.2f}",
                             r["verdict"]])
    m = results["machine"]
    out = [f"## Service under load ({m['cpus']} CPUs, torch {results['torch']}, {results['date']})", "",
           f"{results['args']['clients']} clients, {results['args']['duration']} s per scenario, " +
           ("; ".join(f"{sc['scenario']}: " + ", ".join(f"{v:.0%} {k}" for k, v in sc["mix"].items())
                      for sc in results["scenarios"]) + "."), "",
           table(["scenario", "request", "sent", "2xx", "req/s", "client p50 ms", "client p99 ms", "server p50 ms",
                  "server p99 ms"], rows), "",
           table(["scenario", "requests", "non-2xx (kind status: count)", "errors other than 503/429 + Retry-After",
                  "acked classes / examples", "stored classes / examples", "prototype diff",
                  "server RSS MB idle / peak / 10 s after", "verification"], checks)]
    if reads:
        out += ["", table(["scenario", "notifications", "requests", "version reads", "reads / request",
                           "notifications received", "reads / request by replica"], reads)]
    if restarts:
        out += ["", table(["scenario", "stop mode", "down s", "5xx other than 503", "no answer", "non-2xx by status",
                           "leaking bodies", "503 window", "first ok register after up (s)",
                           "last error after up (s)", "verdict"], restarts)]
    for sc in results["scenarios"]:
        for p in sc["verify"]["problems"][:10]:
            out.append(f"- {sc['scenario']}: {p}")
    return "\n".join(out)


# -- scenarios -------------------------------------------------------------------------------------
async def run_scenario(args: argparse.Namespace, name: str, bundle: Path, tmp: Path) -> dict[str, Any]:
    cluster: PgCluster | None = None
    replicas = 1 if name in ("sqlite", "photos") else args.replicas
    notifications = name == "postgres"
    if name in ("sqlite", "photos"):
        db_url = f"sqlite:///{tmp / f'{name}.db'}"
    elif args.db:
        db_url = args.db
    else:
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise SystemExit("PostgreSQL binaries (initdb, pg_ctl) not found; install postgresql or pass --db")
        cluster = PgCluster(bin_dir)
        db_url = cluster.database(f"load_{uuid.uuid4().hex[:8]}")
    env = {"FEWSHOT_SYNC_INTERVAL_S": str(args.sync_interval_s), "FEWSHOT_STORE_NOTIFICATIONS": str(int(notifications))}
    servers = [ServiceProcess(bundle, db_url, tmp / f"{name}-{r}.log", log_level="warning", env=env)
               for r in range(replicas)]
    ledger = Ledger(prefix="L-")
    marks: dict[str, Any] = {}
    try:
        for s in servers:
            s.start()
        ports = [s.port for s in servers]
        load = Load(args, ports, [], ledger)
        load.workspaces = workspaces = await setup_workspaces(ports[0], args.workspaces, ledger, load.image)
        restart = asyncio.create_task(pg_restart(args, cluster, load, marks)) if args.pg_restart and cluster else None
        before = await store_counters(ports)
        rss = RssWatch([s.pid for s in servers])
        await asyncio.sleep(1.0)
        rss.idle_mb = rss.now()
        watcher = asyncio.create_task(rss.watch())
        wall = await load.run(args.duration)
        rss.done = True
        await watcher
        await asyncio.sleep(10.0)
        rss.after_mb = rss.now()
        if restart is not None:
            await restart
        after = await store_counters(ports)
        verified = await verify(args, ports, db_url, bundle, workspaces, ledger)
    finally:
        for s in servers:
            s.stop()
        if cluster is not None:
            cluster.close()
    result = {"scenario": name, "replicas": replicas, "db": "sqlite" if name in ("sqlite", "photos") else "postgresql",
              "notifications": notifications, "load": summarise(load.samples, wall), "verify": verified,
              "rss": {"idle_mb": rss.idle_mb, "peak_mb": rss.peak_mb, "after_mb": rss.after_mb}, "mix": load.mix}
    if name not in ("sqlite", "photos"):
        result["store_reads"] = read_report(load.samples, before, after)
    if marks:
        assert cluster is not None
        leaks = sum(bool(cluster.secrets_in(x.body, db_url.rsplit("/", 1)[1])) for x in load.samples)
        result["restart"] = restart_report(load.samples, marks, leaks)
    return result


class RssWatch:
    """The servers' resident memory (all replicas together): idle, peak while `watch` runs, after."""

    def __init__(self, pids: list[int]) -> None:
        self.pids, self.done = pids, False
        self.idle_mb = self.peak_mb = self.after_mb = 0.0

    def now(self) -> float:
        return sum(rss_mb(p) for p in self.pids)

    async def watch(self) -> None:
        while not self.done:
            self.peak_mb = max(self.peak_mb, self.now())
            await asyncio.sleep(0.1)


async def pg_restart(args: argparse.Namespace, cluster: PgCluster, load: Load, marks: dict[str, Any]) -> None:
    """Stop PostgreSQL a third of the way in, keep it down `--pg-down-s`, start it again."""
    await asyncio.sleep(args.duration / 3)
    marks["stop_mode"] = args.pg_stop_mode
    marks["down_s"] = args.pg_down_s
    marks["stop_issued_s"] = load.now()
    await asyncio.to_thread(cluster.stop, args.pg_stop_mode)
    marks["down_from_s"] = load.now()
    await asyncio.sleep(args.pg_down_s)
    marks["start_issued_s"] = load.now()
    await asyncio.to_thread(cluster.start)
    marks["up_s"] = load.now()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["sqlite", "postgres", "postgres-polling", "replicas", "photos", "all"],
                   default="all",
                   help="all: sqlite, postgres; replicas: postgres (notifications on), postgres-polling (off)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load per scenario")
    p.add_argument("--max-requests", type=int, default=200_000, help="request budget per scenario")
    p.add_argument("--replicas", type=int, default=2, help="service processes sharing PostgreSQL")
    p.add_argument("--db", help="postgresql:// URL to use instead of a throwaway server (no --pg-restart)")
    p.add_argument("--workspaces", type=int, default=4)
    p.add_argument("--classify-share", type=float, default=0.7)
    p.add_argument("--new-class-share", type=float, default=0.2, help="of registrations: new classes")
    p.add_argument("--request-timeout", type=float, default=30.0)
    p.add_argument("--sync-interval-s", type=float, default=0.0, help="FEWSHOT_SYNC_INTERVAL_S of the servers")
    p.add_argument("--prototype-tolerance", type=float, default=1e-3)
    p.add_argument("--pg-restart", action="store_true", help="restart PostgreSQL a third of the way in")
    p.add_argument("--pg-stop-mode", choices=["fast", "immediate"], default="fast")
    p.add_argument("--pg-down-s", type=float, default=3.0)
    p.add_argument("--bundle", type=Path, help="bundle directory (default: an untrained Conv-4 made here; "
                   "photos: the photos bundle, required)")
    p.add_argument("--mix", default="classify=0.5,explain=0.1,occlusion=0.05,insight=0.1,register=0.25",
                   help="photos: shares of each kind of request")
    p.add_argument("--occlusion-cells", type=int, default=7, help="photos: occlusion map cells (1 + cells^2 images)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "load.json")
    args = p.parse_args(argv)
    if args.pg_restart and args.db:
        p.error("--pg-restart needs the throwaway PostgreSQL this script starts; drop --db")
    args.photos = args.scenario == "photos"
    if args.photos and args.bundle is None:
        p.error("--scenario photos needs --bundle PHOTOS_BUNDLE (e.g. the photos_bundle of a quickstart run)")
    if args.duration > 900 or args.clients > 256:
        p.error("bounded: --duration <= 900 s, --clients <= 256")
    names = {"all": ["sqlite", "postgres"], "replicas": ["postgres", "postgres-polling"]}.get(args.scenario,
                                                                                          [args.scenario])
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fewshot-load-") as tmp:
        bundle = args.bundle or make_bundle(Path(tmp) / "bundle")
        scenarios = [asyncio.run(run_scenario(args, n, bundle, Path(tmp))) for n in names]
    results = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(["python", *sys.argv]) if argv is None else f"main({argv!r})",
               "torch": metadata.version("torch"), "onnxruntime": metadata.version("onnxruntime"),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                           "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]},
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "db"},
               "scenarios": scenarios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))  # the raw numbers first, whatever the report does
    text = report(results)
    print(text)
    args.out.with_suffix(".md").write_text(f"{text}\n\nCommand: `{results['command']}`\n\nraw numbers: {args.out.name}\n")
    print(f"\nraw numbers: {args.out} (tables: {args.out.with_suffix('.md')})")
    if any(sc["verify"]["problems"] or sc.get("restart", {}).get("verdict") == "FAIL"
           or (sc["scenario"] == "photos" and sc["load"]["errors_other_than_busy"]) for sc in scenarios):
        sys.exit(1)


if __name__ == "__main__":
    main()
