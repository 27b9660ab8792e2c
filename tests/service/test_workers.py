"""Several workers (`fewshot.service.http.serve.supervise`): each listens on its own SO_REUSEPORT
socket, so keep-alive clients spread over them (uvicorn's shared socket gave one worker all 16 in
5 of 6 tries); a worker that dies is replaced; SIGTERM stops them all."""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fewshot.errors import ConfigError
from fewshot.service.http.serve import reuse_port_socket

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreading is Linux's")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            return s.recv(100).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def connection_owners(port: int, n: int) -> tuple[list[socket.socket], collections.Counter[str]]:
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    for c in conns:  # a served request proves the connection was accepted by a worker
        c.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.recv(100).startswith(b"HTTP/1.1 200")
    return conns, owners_of(port)


def listening(port: int) -> int:
    """How many sockets listen on `port` (from /proc/net/tcp)."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for f in rows if int(f[1].split(":")[1], 16) == port and f[3] == "0A")


def owners_of(port: int) -> collections.Counter[str]:
    """pid -> how many established connections to `port` it holds (from /proc, as `ss -p` reads it)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and f[3] == "01":  # local port, state ESTABLISHED
            inodes.add(f[9])
    owners: collections.Counter[str] = collections.Counter()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:
            continue
        for link in links:
            m = re.fullmatch(r"socket:\[(\d+)\]", link)
            if m and m[1] in inodes:
                owners[fd_dir.parent.name] += 1
    return owners


def test_workers_share_connections_replace_the_dead_and_stop_together(tiny_bundle: Path, tmp_path: Path) -> None:
    port = free_port()
    code = ("import sys; from fewshot.service.app import serve; "
            "serve(sys.argv[1], sys.argv[2], '127.0.0.1', int(sys.argv[3]), workers=2, log_level='warning')")
    env = {**os.environ, "FEWSHOT_ADMIN_KEY": "k" * 32}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tiny_bundle), str(tmp_path / "w.db"), str(port)], env=env)
    try:
        deadline = time.time() + 120
        while not ready(port):
            assert proc.poll() is None and time.time() < deadline, "the service did not start"
            time.sleep(0.2)
        while listening(port) < 2:  # one listening socket per worker (a shared socket stays at 1)
            assert time.time() < deadline, f"{listening(port)} listening socket(s) on the port, not one per worker"
            time.sleep(0.2)
        conns, owners = connection_owners(port, 16)
        assert len(owners) == 2 and sum(owners.values()) == 16 and min(owners.values()) >= 2, owners
        for c in conns:
            c.close()
        victim = int(next(iter(owners)))
        os.kill(victim, signal.SIGKILL)
        time.sleep(1.5)  # the supervisor looks every 0.5 s
        deadline = time.time() + 120
        while listening(port) < 2 and time.time() < deadline:  # the new worker has started
            time.sleep(0.2)
        while True:
            conns, owners = connection_owners(port, 16)
            for c in conns:
                c.close()
            if len(owners) == 2 or time.time() > deadline:
                break
            time.sleep(0.5)
        assert len(owners) == 2 and str(victim) not in owners, owners
        workers = [int(p) for p in owners]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0
    for pid in workers:  # no orphan keeps the port
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not ready(port)


def test_a_taken_port_is_refused_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port}.*--port"):
            reuse_port_socket("127.0.0.1", port)
