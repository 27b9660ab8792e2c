"""deploy/: the compose file (PostgreSQL, two replicas, nginx) cannot be run here (no docker), so
check what can be checked without it: it parses, the replicas' command is one `fewshot serve`
accepts, its settings are ones the service reads, ports and names agree with nginx.conf and the
Dockerfile, and no password is written into a URL."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from fewshot.cli import build_parser
from fewshot.service.settings import ENV_PREFIX, ServiceSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # type: ignore[no-any-return]


def replicas(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("command", [""])[0] == "serve"}


def test_compose_has_postgres_two_replicas_and_nginx(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "replica1", "replica2", "nginx"}
    assert len(replicas(compose)) == 2
    for name, svc in replicas(compose).items():
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert "ports" not in svc, f"{name} publishes a port: only nginx should"
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile" and (DEPLOY / "Dockerfile").is_file()
    assert compose["services"]["nginx"]["depends_on"] == {n: {"condition": "service_healthy"} for n in replicas(compose)}


def test_replica_command_and_settings_are_what_serve_reads(compose: dict[str, Any]) -> None:
    settings = {ENV_PREFIX + f.name.upper() for f in fields(ServiceSettings)}
    db = compose["services"]["postgres"]["environment"]
    for name, svc in replicas(compose).items():
        args = build_parser().parse_args(svc["command"])
        assert args.bundles == ["/bundle"] and args.host == "0.0.0.0"
        m = re.fullmatch(r"postgresql://([^:@/]+)@([^:/]+):(\d+)/(\w+)", args.db)
        assert m, f"{name}: --db {args.db!r} is not postgresql://user@host:port/db (no password in the URL)"
        assert (m.group(1), m.group(2), m.group(4)) == (db["POSTGRES_USER"], "postgres", db["POSTGRES_DB"])
        assert svc["expose"] == [str(args.port)]
        env = svc["environment"]
        assert env["PGPASSWORD"] == db["POSTGRES_PASSWORD"]  # the same secret, from the environment
        unknown = {k for k in env if k.startswith(ENV_PREFIX)} - settings
        assert not unknown, f"{name}: {sorted(unknown)} are not service settings"
        assert env["FEWSHOT_STORE_NOTIFICATIONS"] == "1"
        ServiceSettings.from_env({k: v for k, v in env.items() if k.startswith(ENV_PREFIX) and "${" not in v},
                                 bundle_path="/bundle")
        assert any(v.endswith(":/bundle:ro") for v in svc["volumes"])


def test_nginx_balances_over_the_replicas_on_their_ports(compose: dict[str, Any]) -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    upstream = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", conf, re.MULTILINE)
    ports = {n: build_parser().parse_args(s["command"]).port for n, s in replicas(compose).items()}
    assert sorted(upstream) == sorted((n, str(p)) for n, p in ports.items())
    listen = re.search(r"^\s*listen\s+(\d+);", conf, re.MULTILINE)
    assert listen and compose["services"]["nginx"]["ports"] == [f"{listen.group(1)}:{listen.group(1)}"]
    body = re.search(r"client_max_body_size\s+(\d+)m;", conf)
    assert body and int(body.group(1)) * 2**20 >= ServiceSettings(bundle_path="x").max_body_bytes
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in compose["services"]["nginx"]["volumes"]


def test_dockerfile_serves_the_mounted_bundle() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["fewshot"]' in text and "/readyz" in text
    assert (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()[1] == "*"  # context: only what it needs
