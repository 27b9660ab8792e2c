"""`serve`: the service under uvicorn (one process or several workers), with the proxy trust and
the slow-client deadline (`fewshot.service.protocol`) it needs.

Several workers on Linux each listen on their own socket of the address (SO_REUSEPORT), so the
kernel spreads connections over them. uvicorn's workers share one socket, and the first worker to
wake accepts every pending connection: 16 keep-alive clients landed all on one of two workers in
5 of 6 tries (issue 16's throughput scattered between one worker's 650 and two workers' 1,600
requests/s from phase to phase). Elsewhere the workers share one socket, as uvicorn does.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from fewshot.errors import ConfigError
from fewshot.service.http.app import create_app
from fewshot.service.middleware import RedactQueryFilter
from fewshot.service.protocol import ReadDeadline, serving_protocol
from fewshot.service.settings import ServiceSettings

log = logging.getLogger("fewshot.service")


def proxy_trust(env: Mapping[str, str]) -> tuple[bool, str | None]:
    """(whether to read X-Forwarded-For, from which addresses) for uvicorn. The header is trusted only
    when FORWARDED_ALLOW_IPS names the proxy's addresses or networks: otherwise any local process (an
    ssh tunnel, a port-forward) could pick its client address and dodge the key throttle. "*" is
    refused: with it uvicorn takes the leftmost address of the header, which the client writes."""
    raw = env.get("FORWARDED_ALLOW_IPS", "").strip()
    if not raw:
        return False, None
    if "*" in (p.strip() for p in raw.split(",")):
        raise ConfigError(f"FORWARDED_ALLOW_IPS={raw!r} trusts X-Forwarded-For from any client, so any client "
                          "could choose the address the key throttle counts; name your proxy's address or network "
                          "(e.g. FORWARDED_ALLOW_IPS=172.28.0.10 or 10.0.0.0/8), or unset it")
    return True, raw


def serve(bundles: str | Path | Sequence[str | Path], db_url: str, host: str = "127.0.0.1", port: int = 8000, *,
          admin_key: str | None = None, workers: int = 1, log_level: str = "info") -> None:
    """Run the service under uvicorn (blocking) on one or more bundles (each a folder or NAME=PATH;
    the first is the default model). Other settings come from FEWSHOT_* variables."""
    logging.getLogger("uvicorn.access").addFilter(RedactQueryFilter())
    specs = [str(bundles)] if isinstance(bundles, str | Path) else [str(b) for b in bundles]
    if not specs:
        raise ConfigError("no bundle given; pass one or more bundle folders (or NAME=PATH)")
    settings = ServiceSettings.from_env(bundle_path=specs[0], extra_bundles=tuple(specs[1:]) or None, db_url=db_url,
                                        admin_key=admin_key)
    if admin_key is not None:
        log.warning("SECURITY: the admin key was given as a command-line argument (--admin-key): every user of "
                    "this machine can read it in `ps` and shell history; set FEWSHOT_ADMIN_KEY instead")
    if not settings.torch_threads:
        settings = replace(settings, torch_threads=1)
    if not settings.malloc_arenas:  # memory back to the system after a burst (fewshot.service.embedding)
        settings = replace(settings, malloc_arenas=2)
    proxy_headers, allow_ips = proxy_trust(os.environ)
    if settings.request_read_timeout_s <= 0:
        raise ConfigError(f"FEWSHOT_REQUEST_READ_TIMEOUT_S={settings.request_read_timeout_s} must be > 0 seconds")
    # slow clients: each request must arrive within request_read_timeout_s (fewshot.service.protocol)
    ReadDeadline.read_timeout_s = settings.request_read_timeout_s
    os.environ["FEWSHOT_REQUEST_READ_TIMEOUT_S"] = str(settings.request_read_timeout_s)  # for worker processes
    common: dict[str, Any] = dict(host=host, port=port, log_level=log_level, proxy_headers=proxy_headers,
                                  forwarded_allow_ips=allow_ips, http=serving_protocol())
    if workers == 1:
        uvicorn.run(create_app(settings), **common)
        return
    os.environ.update({"FEWSHOT_BUNDLE_PATH": settings.bundle_path,
                       "FEWSHOT_EXTRA_BUNDLES": os.pathsep.join(settings.extra_bundles), "FEWSHOT_DB_URL": settings.db_url,
                       "FEWSHOT_ADMIN_KEY": settings.admin_key, "FEWSHOT_TORCH_THREADS": str(settings.torch_threads),
                       "FEWSHOT_MALLOC_ARENAS": str(settings.malloc_arenas)})
    target = "fewshot.service.http.app:create_app_from_env"
    if sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT") and port != 0:
        supervise(uvicorn.Config(target, factory=True, workers=workers, **common), workers)
    else:
        uvicorn.run(target, factory=True, workers=workers, **common)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT: each worker listens on its own."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose a free port with --port") from None
    return sock


def _worker(config: uvicorn.Config) -> None:
    """One worker process: its own listening socket, the app from FEWSHOT_* variables."""
    config.configure_logging()
    uvicorn.Server(config).run(sockets=[reuse_port_socket(config.host, config.port)])


def supervise(config: uvicorn.Config, workers: int) -> None:
    """Run `workers` worker processes until SIGINT / SIGTERM; a worker that dies is started again,
    one that fails at startup stops them all."""
    ctx = multiprocessing.get_context("spawn")
    reserved = reuse_port_socket(config.host, config.port)  # the address is checked (and held) before any worker
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: list[Any] = []
    failed = False
    try:
        while not stop.is_set():
            for i in range(workers):
                p = procs[i] if i < len(procs) else None
                if p is not None and p.is_alive():
                    continue
                if p is not None:
                    failed = p.exitcode == STARTUP_FAILURE
                    if failed:
                        log.error("a worker failed to start (exit code %s); stopping", p.exitcode)
                        stop.set()
                        break
                    log.warning("worker %s exited with code %s; starting another", p.pid, p.exitcode)
                p = ctx.Process(target=_worker, args=(config,), name=f"fewshot-worker-{i}")
                p.start()
                procs[i:i + 1] = [p]
            stop.wait(0.5)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        reserved.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise SystemExit(STARTUP_FAILURE)
