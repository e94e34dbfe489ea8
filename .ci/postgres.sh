#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on loopback for the concurrent-writer test.
# Source it: it exports CRYSTAL_LLM_POSTGRES_URL and stops the server on exit.
# Installs Debian's postgresql package when no server is present.
set -euo pipefail

pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

if [ -z "$(pg_bindir)" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
PG_BIN=$(pg_bindir)
PG_PORT=${CRYSTAL_LLM_PG_PORT:-55432}
PG_DATA=$(mktemp -d /tmp/crystal-llm-pg.XXXXXX)

as_pg() {
    # The server refuses to run as root.
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
[ "$(id -u)" -eq 0 ] && chown postgres "$PG_DATA"
as_pg "$PG_BIN/initdb" -D "$PG_DATA" -A trust -U postgres >/dev/null
as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DATA" start >/dev/null
as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres crystal_llm
export CRYSTAL_LLM_POSTGRES_URL="postgresql://postgres@127.0.0.1:$PG_PORT/crystal_llm"
trap 'as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast stop >/dev/null; rm -rf "$PG_DATA"' EXIT
echo "PostgreSQL ready at $CRYSTAL_LLM_POSTGRES_URL"
