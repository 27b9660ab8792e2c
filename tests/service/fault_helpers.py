"""Fault injection for the service tests and the load benchmark: a real `fewshot serve` subprocess,
a PostgreSQL cluster we can stop and start (password auth, so leaks are detectable), tmpfs and
read-only mounts for disk faults, and a registration stream whose ledger says what the server
acknowledged, so a check afterwards can prove nothing acknowledged was lost and nothing is half
written."""

from __future__ import annotations

import errno
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from postgres_server import _as_user_prefix, _run  # tests/service/
from service_helpers import class_images, png_bytes

ADMIN = "fault-admin-" + secrets.token_hex(8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def image_files(seed: int, n: int, field_name: str = "images") -> list[tuple[str, tuple[str, bytes, str]]]:
    """n distinct 28x28 PNG uploads (multipart `files=` for httpx)."""
    return [(field_name, (f"{seed}-{i}.png", png_bytes(a), "image/png")) for i, a in enumerate(class_images(seed, n))]


# -- a real server process -------------------------------------------------------------------------
class ServiceProcess:
    """`python -m fewshot.cli serve` on a free loopback port; stdout/stderr go to `log_path`.
    With `log_level` (e.g. "warning": no access log, for load runs) it is `fewshot.service.app.serve`
    called with that level, the function the CLI calls."""

    def __init__(self, bundle: Path, db_url: str, log_path: Path, *, admin_key: str = ADMIN,
                 env: dict[str, str] | None = None, port: int | None = None, log_level: str | None = None) -> None:
        self.bundle, self.db_url, self.log_path, self.admin_key = bundle, db_url, log_path, admin_key
        self.env, self.port, self.log_level = env or {}, port or free_port(), log_level
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 120.0) -> ServiceProcess:
        """Start and wait until /readyz answers 200."""
        cmd = [sys.executable, "-m", "fewshot.cli", "serve", str(self.bundle), "--db", self.db_url,
               "--port", str(self.port), "--admin-key", self.admin_key]
        if self.log_level:
            code = ("import sys; from fewshot.service.app import serve; serve(sys.argv[1], sys.argv[2], '127.0.0.1', "
                    "int(sys.argv[3]), admin_key=sys.argv[4], log_level=sys.argv[5])")
            cmd = [sys.executable, "-c", code, str(self.bundle), self.db_url, str(self.port), self.admin_key,
                   self.log_level]
        env = {**os.environ, **self.env}
        # through a pipe, not straight into the log file: a file-size limit put on the server
        # (RLIMIT_FSIZE, the unprivileged disk-full fault) must hit its store, not its log
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._copy_log, args=(self.proc,), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fewshot serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            with suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"fewshot serve was not ready in {timeout_s:.0f} s:\n{self.log_tail()}")

    def _copy_log(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with open(self.log_path, "ab") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def create_workspace(url: str, name: str = "fault", admin_key: str = ADMIN) -> tuple[str, str]:
    r = httpx.post(url + "/workspaces", json={"name": name}, headers=auth(admin_key), timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["api_key"]


def stored_classes_api(url: str, ws: str, key: str) -> dict[str, tuple[str, int]]:
    """class id -> (label, n_examples), read through GET /workspaces/{ws}/classes."""
    r = httpx.get(f"{url}/workspaces/{ws}/classes", headers=auth(key), timeout=30)
    assert r.status_code == 200, r.text
    return {c["id"]: (c["label"], c["n_examples"]) for c in r.json()}


def stored_classes_direct(db_url: str, ws: str) -> dict[str, tuple[str, int]]:
    """The same, read straight from the store (no service in between)."""
    from fewshot.service.store import open_store

    store = open_store(db_url)
    try:
        return {c.id: (c.label, c.n_examples) for c in store.list_classes(ws)}
    finally:
        store.close()


# -- PostgreSQL we can stop and start ----------------------------------------------------------------
class PgCluster:
    """A throwaway cluster: trust on its unix socket (admin), scram passwords on TCP (the service),
    so a leaked URL, user or password in an error body is detectable. `stop()` / `start()` keep the
    data directory and port, like a real database restart."""

    def __init__(self, bin_dir: Path, *, role: str = "fewshot_fault_svc") -> None:
        self.bin_dir, self.role = bin_dir, role
        self.password = "pw-" + secrets.token_hex(12)
        self.root = Path(tempfile.mkdtemp(prefix="fewshot-pgfault-"))
        self.root.chmod(0o755)
        self.data, self.port = self.root / "data", free_port()
        self.prefix = _as_user_prefix(self.root)
        self.superuser = "postgres" if self.prefix else pwd.getpwuid(os.geteuid()).pw_name
        self.running = False
        _run([*self.prefix, str(bin_dir / "initdb"), "-D", str(self.data), "-U", self.superuser, "-E", "UTF8",
              "--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256"])
        self.start()
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {role} LOGIN CREATEDB PASSWORD '{self.password}'")

    @property
    def admin_url(self) -> str:
        return f"postgresql://{self.superuser}@/postgres?host={self.root}&port={self.port}"

    def start(self) -> None:
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=200"
        _run([*self.prefix, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log.txt"),
              "-o", opts, "-w", "-t", "60", "start"])
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """`fast`: sessions are terminated, clean shutdown; `immediate`: like a crash (recovery on start)."""
        _run([*self.prefix, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"])
        self.running = False

    def database(self, name: str) -> str:
        """A new database owned by the service role; its password-carrying TCP URL."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER {self.role}')
        return f"postgresql://{self.role}:{self.password}@127.0.0.1:{self.port}/{name}"

    def secrets_in(self, text: str, db_name: str) -> list[str]:
        """Which parts of the connection details appear in `text` (should be none)."""
        needles = {"password": self.password, "user": self.role, "database": db_name,
                   "host:port": f"127.0.0.1:{self.port}", "url scheme": "postgresql://"}
        return [k for k, v in needles.items() if v in text]

    def close(self) -> None:
        if self.running:
            subprocess.run([*self.prefix, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                            "-w", "stop"], capture_output=True, timeout=60)
            self.running = False
        time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)


# -- disks that fill up or are read-only ---------------------------------------------------------------
class MountNotPermitted(RuntimeError):
    """mount(8) is missing or refused (not root, or no CAP_SYS_ADMIN in this container)."""


def _mount(args: Sequence[str]) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        raise MountNotPermitted("mounting needs root and mount(8)")
    r = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise MountNotPermitted(f"mount {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A small tmpfs at `path`: writes beyond `size_bytes` fail with ENOSPC, like a full disk."""
    path.mkdir(parents=True, exist_ok=True)
    _mount(["-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(path)])
    try:
        yield path
    finally:
        _umount(path)


def set_immutable(paths: Sequence[Path], on: bool) -> None:
    """`chattr +i` / `-i`: writes to these files fail with EPERM, even root's, while reads (and the
    SQLite -shm mapping, left alone) keep working: a store that turned read-only under a running
    server. (A live remount to read-only is refused with EBUSY while SQLite holds the file open for
    writing.) Needs root and a filesystem with inode flags (ext4, xfs, btrfs)."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        raise MountNotPermitted("chattr +i needs root and chattr(1)")
    r = subprocess.run(["chattr", "+i" if on else "-i", *map(str, paths)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise MountNotPermitted(f"chattr {'+i' if on else '-i'} failed ({r.returncode}): {r.stderr.strip()}")


def fill_disk(directory: Path) -> Path:
    """Write a filler file in `directory` until the filesystem says ENOSPC; return it."""
    filler = directory / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            while True:
                try:
                    f.write(b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return filler


# -- a stream of registrations and its ledger ----------------------------------------------------------
@dataclass
class Outcome:
    kind: str  # "create" | "add" | "classify" | "read" | "readyz"
    t_sent: float  # time.monotonic()
    t_done: float
    status: int  # 0: no answer (connection refused / reset / timeout)
    headers: dict[str, str]
    body: str


@dataclass
class Ledger:
    """What the server acknowledged (2xx), refused (4xx: never applied) or left unknown (no answer
    or 5xx: maybe applied). Stream classes have labels starting with `prefix`."""

    prefix: str = "s-"
    labels: dict[str, str] = field(default_factory=dict)  # acked class id -> label
    acked: Counter[str] = field(default_factory=Counter)  # class id -> images acknowledged
    maybe_images: Counter[str] = field(default_factory=Counter)  # class id -> images in unknown additions
    maybe_labels: dict[str, int] = field(default_factory=dict)  # label -> images of an unknown creation
    refused_labels: set[str] = field(default_factory=set)
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, o: Outcome) -> None:
        with self.lock:
            self.outcomes.append(o)

    @property
    def n_acked(self) -> int:
        with self.lock:
            return sum(1 for o in self.outcomes if o.kind in ("create", "add") and 200 <= o.status < 300)

    def statuses(self, kinds: Sequence[str] = ("create", "add", "classify", "read")) -> Counter[int]:
        with self.lock:
            return Counter(o.status for o in self.outcomes if o.kind in kinds)

    def problems(self, stored: dict[str, tuple[str, int]]) -> list[str]:
        """Everything in `stored` (class id -> (label, n_examples)) that contradicts the ledger."""
        out = []
        for cid, label in self.labels.items():
            if cid not in stored:
                out.append(f"acknowledged class {cid} ({label!r}, {self.acked[cid]} images acknowledged) is missing")
                continue
            lo = self.acked[cid]
            hi = lo + self.maybe_images[cid]
            if not lo <= stored[cid][1] <= hi:
                out.append(f"class {cid} ({label!r}) holds {stored[cid][1]} examples; acknowledged {lo}, "
                           f"{hi - lo} more in unanswered requests")
        for cid, (label, n) in stored.items():
            if n == 0:
                out.append(f"class {cid} ({label!r}) is half written: it has no examples")
            if cid in self.labels or not label.startswith(self.prefix):
                continue
            if label in self.maybe_labels:
                if n != self.maybe_labels[label]:
                    out.append(f"class {label!r} from an unanswered request holds {n} of {self.maybe_labels[label]} images")
            elif label in self.refused_labels:
                out.append(f"class {label!r} was refused with a 4xx but is stored ({n} examples)")
            else:
                out.append(f"class {cid} ({label!r}) is stored but was never sent")
        return out


class RegistrationStream:
    """`clients` threads, each with its own connection, registering until `stop()`: a new class of
    3 images every `create_every`-th request, else 1-2 images added to an acknowledged class. Optional
    classify requests in between (1 in `classify_every`)."""

    def __init__(self, urls: Sequence[str], ws: str, key: str, ledger: Ledger, *, clients: int = 4,
                 create_every: int = 3, classify_every: int = 0, timeout_s: float = 10.0, seed: int = 0) -> None:
        self.urls, self.ws, self.key, self.ledger = list(urls), ws, key, ledger
        self.clients, self.create_every, self.classify_every = clients, create_every, classify_every
        self.timeout_s, self.seed = timeout_s, seed
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> RegistrationStream:
        for i in range(self.clients):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self, i: int) -> None:
        rng = np.random.default_rng(self.seed * 1000 + i)
        url = self.urls[i % len(self.urls)]
        h = auth(self.key)
        n = writes = 0  # writes counts registrations only, so classify turns never starve class creation
        with httpx.Client(base_url=url, timeout=self.timeout_s, headers=h) as http:
            while not self._stop.is_set():
                n += 1
                img_seed = int(rng.integers(1 << 30))
                with self.ledger.lock:
                    known = list(self.ledger.labels)
                if self.classify_every and n % self.classify_every == 0 and known:
                    self.call(http, "classify", f"/workspaces/{self.ws}/classify", files=image_files(img_seed, 1))
                    continue
                writes += 1
                if not known or writes % self.create_every == 0:
                    label = f"{self.ledger.prefix}{i}-{n}-{secrets.token_hex(3)}"
                    self.create(http, label, img_seed)
                else:
                    self.add(http, known[int(rng.integers(len(known)))], img_seed, int(rng.integers(1, 3)))

    def call(self, http: httpx.Client, kind: str, path: str, **kw: Any) -> tuple[int, Any]:
        t0 = time.monotonic()
        try:
            r = http.post(path, **kw)
        except httpx.HTTPError:
            self.ledger.record(Outcome(kind, t0, time.monotonic(), 0, {}, ""))
            time.sleep(0.05)  # server gone: do not spin
            return 0, None
        self.ledger.record(Outcome(kind, t0, time.monotonic(), r.status_code, dict(r.headers), r.text))
        try:
            body = r.json()
        except ValueError:
            body = None
        return r.status_code, body

    def create(self, http: httpx.Client, label: str, seed: int) -> None:
        status, body = self.call(http, "create", f"/workspaces/{self.ws}/classes", data={"label": label},
                                  files=image_files(seed, 3))
        with self.ledger.lock:
            if 200 <= status < 300:
                self.ledger.labels[body["id"]] = label
                self.ledger.acked[body["id"]] += 3
            elif 400 <= status < 500:
                self.ledger.refused_labels.add(label)
            else:
                self.ledger.maybe_labels[label] = 3

    def add(self, http: httpx.Client, cid: str, seed: int, n: int) -> None:
        status, _ = self.call(http, "add", f"/workspaces/{self.ws}/classes/{cid}/images", files=image_files(seed, n))
        with self.ledger.lock:
            if 200 <= status < 300:
                self.ledger.acked[cid] += n
            elif not 400 <= status < 500:
                self.ledger.maybe_images[cid] += n

