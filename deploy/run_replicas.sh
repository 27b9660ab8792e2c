#!/usr/bin/env bash
# Two (or more) `fewshot serve` replicas on one PostgreSQL database, without docker.
#
#   PGPASSWORD=... FEWSHOT_ADMIN_KEY=... deploy/run_replicas.sh BUNDLE postgresql://user@host:5432/db
#   PORTS="8001 8002 8003" deploy/run_replicas.sh ...      # default: 8001 8002
#
# Put any load balancer in front of the ports (deploy/nginx.conf is one), or spread clients over
# them. The password goes in PGPASSWORD (read by libpq), not in the URL, so `ps` never shows it.
# Ctrl-C (or any replica exiting) stops them all.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 BUNDLE postgresql://user@host:port/db   (password in PGPASSWORD)" >&2
  exit 2
fi
bundle=$1
db=$2
read -r -a ports <<< "${PORTS:-8001 8002}"
pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait || true; }
trap stop EXIT INT TERM
for port in "${ports[@]}"; do
  fewshot serve "$bundle" --db "$db" --host "${HOST:-127.0.0.1}" --port "$port" &
  pids+=("$!")
done
echo "replicas on ports ${ports[*]} (pids ${pids[*]}); /readyz says whether each listens for changes" >&2
wait -n
