#!/usr/bin/env bash
# Start (or stop) a throwaway PostgreSQL on 127.0.0.1 for tests; prints the URL to use.
# usage: .ci/pg.sh start DIR [PORT] | .ci/pg.sh stop DIR
set -euo pipefail
cmd=$1 dir=$2 port=${3:-15432}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$1"; else sh -c "$1"; fi; }
case $cmd in
  start)
    mkdir -p "$dir"; chmod 755 "$dir"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
    as_pg "$bin/initdb -D $dir/data -U twoway --auth=trust -E UTF8" >/dev/null
    as_pg "$bin/pg_ctl -D $dir/data -l $dir/log -w start -o '-k $dir -p $port -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200'" >/dev/null
    psql -h 127.0.0.1 -p "$port" -U twoway -d postgres -qc 'create database twoway_test' >/dev/null
    echo "postgresql+psycopg://twoway@127.0.0.1:$port/twoway_test"
    ;;
  stop)
    as_pg "$bin/pg_ctl -D $dir/data -m fast stop" >/dev/null 2>&1 || true
    ;;
esac
