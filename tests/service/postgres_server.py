"""A throwaway PostgreSQL server for tests: initdb into a temp dir, listen on 127.0.0.1:<free port>
and a unix socket in that dir, stop and delete on exit. Runs as the `postgres` user when we are
root (initdb and postgres refuse to run as root)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def find_pg_bin() -> Path | None:
    """Directory with initdb/pg_ctl: $FEWSHOT_PG_BIN, PATH, or Debian's /usr/lib/postgresql/*/bin."""
    candidates = [os.environ.get("FEWSHOT_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    on_path = shutil.which("initdb")
    candidates.append(str(Path(on_path).resolve().parent) if on_path else "")
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_user_prefix(root: Path) -> list[str]:
    if os.geteuid() != 0:
        return []
    pw = pwd.getpwnam("postgres")
    for p in [root, *root.rglob("*")]:
        os.chown(p, pw.pw_uid, pw.pw_gid)
    return ["runuser", "-u", "postgres", "--"]


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")


@contextmanager
def postgres_server(bin_dir: Path) -> Iterator[str]:
    """Yield a `postgresql://` URL of a fresh server with database `fewshot`."""
    root = Path(tempfile.mkdtemp(prefix="fewshot-pg-"))
    root.chmod(0o755)
    data, port = root / "data", _free_port()
    prefix = _as_user_prefix(root)
    user = "postgres" if prefix else pwd.getpwuid(os.geteuid()).pw_name
    started = False
    try:
        _run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", user, "-A", "trust", "-E", "UTF8",
              "--no-sync"])
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200"
        _run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log.txt"), "-o", opts,
              "-w", "-t", "60", "start"])
        started = True
        server = f"postgresql://{user}@127.0.0.1:{port}"
        yield fresh_database(server + "/postgres", "fewshot")
    finally:
        if started:
            subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
        time.sleep(0.1)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(admin_url: str, name: str) -> str:
    """Create database `name` on the server of `admin_url`; return its URL."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name
