#!/usr/bin/env bash
# Receiver benchmark (prints figures; asserts nothing): refreshing a copy with a
# complete bundle via `ferry-receiver load` (verify, stage, drop, COPY, indexes,
# ledger, one transaction) beside `zstd -d < dump.sql.zst | psql` of a plain
# `pg_dump --clean --if-exists` of the same tables (pgbench scale $SCALE plus
# $EVENTS jsonb rows), and peak RSS. Both replace a copy that is already there
# (each target is loaded once before timing): that is the job, every day.
# Usage: bash tests/bench/receiver.sh   (SCALE=50 EVENTS=2000000 RUNS=3)
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/needs.sh
SCALE=${SCALE:-50}; EVENTS=${EVENTS:-2000000}; RUNS=${RUNS:-3}
cargo build -q --release --bins
sender=$PWD/target/release/ferry-sender; receiver=$PWD/target/release/ferry-receiver
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d /tmp/ferry-rbench.XXXXXX)
as=(); [ "$(id -u)" = 0 ] && { chown postgres "$work"; as=(runuser -u postgres --); }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { "${as[@]}" "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
"${as[@]}" "$pgbin/initdb" -D "$work/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
"${as[@]}" "$pgbin/pg_ctl" -D "$work/data" -l "$work/log" -w -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$work -c shared_buffers=512MB -c max_wal_size=8GB -c maintenance_work_mem=256MB" start >/dev/null
psql=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres)
"${psql[@]}" -c "CREATE DATABASE src" -c "CREATE DATABASE viz"
echo "# loading pgbench scale $SCALE and $EVENTS events ..."
"$pgbin/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$port" -U postgres src 2>/dev/null
"${psql[@]}" -d src -c "CREATE TABLE events (id bigserial PRIMARY KEY, kind text, payload jsonb, updated_at timestamptz NOT NULL DEFAULT now())" \
  -c "INSERT INTO events (kind, payload) SELECT 'k' || (g % 10), jsonb_build_object('user', g, 'tags', jsonb_build_array('a', 'b', g % 7), 'note', md5(g::text)) FROM generate_series(1, $EVENTS) g" \
  -c "VACUUM ANALYZE"
rows=$("${psql[@]}" -d src -Atc "SELECT (SELECT count(*) FROM pgbench_accounts)+(SELECT count(*) FROM pgbench_branches)+(SELECT count(*) FROM pgbench_tellers)+(SELECT count(*) FROM pgbench_history)+(SELECT count(*) FROM events)")
pg_dump --clean --if-exists -h 127.0.0.1 -p "$port" -U postgres -t 'public.pgbench_*' -t public.events src | zstd -3 -T2 -q > "$work/dump.sql.zst"
"${psql[@]}" -c "CREATE DATABASE base"

mkdir -p "$work/inbox"
cat > "$work/sender.toml" <<TOML
sender_id = "bench"
state_dir = "$work/sstate"
[source]
url = "postgres://postgres@127.0.0.1:$port/src"
include = ["public.pgbench_*", "public.events"]
[partial]
change_column = "updated_at"
deletes = "off"
[partial.tables."public.pgbench_accounts"]
partial = false
[partial.tables."public.pgbench_branches"]
partial = false
[partial.tables."public.pgbench_tellers"]
partial = false
[partial.tables."public.pgbench_history"]
partial = false
TOML
cat > "$work/receiver.toml" <<TOML
state_dir = "$work/rstate"
inbox = "$work/inbox"
[target]
url = "postgres://postgres@127.0.0.1:$port/viz"
TOML

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
base=(); ours=(); rss=()
zstd -d -q < "$work/dump.sql.zst" | "${psql[@]}" -d base >/dev/null 2>&1
"$sender" --config "$work/sender.toml" complete >/dev/null 2>&1
mv "$work"/sstate/outbox/*.tar.zst "$work/inbox/"
"$receiver" --config "$work/receiver.toml" load >/dev/null 2>&1
rm -f "$work"/inbox/*.tar.zst
for i in $(seq "$RUNS"); do
  s=$(date +%s.%N)
  zstd -d -q < "$work/dump.sql.zst" | "${psql[@]}" -d base >/dev/null 2>&1
  base+=("$(echo "$(date +%s.%N) - $s" | bc)")
  "$sender" --config "$work/sender.toml" complete >/dev/null 2>&1
  mv "$work"/sstate/outbox/*.tar.zst "$work/inbox/"
  /usr/bin/time -f "%e %M" -o "$work/time" "$receiver" --config "$work/receiver.toml" load >/dev/null 2>"$work/err" || { cat "$work/err"; exit 1; }
  read -r secs kb < "$work/time"; ours+=("$secs"); rss+=("$kb")
  rm -f "$work"/inbox/*.tar.zst
done
b=$(printf '%s\n' "${base[@]}" | median); o=$(printf '%s\n' "${ours[@]}" | median); r=$(printf '%s\n' "${rss[@]}" | sort -n | tail -1)
echo
echo "## refresh with a complete: $rows rows (pgbench scale $SCALE + $EVENTS events), median of $RUNS runs"
printf '| method | s | rows/s | peak RSS MiB |\n|---|---|---|---|\n'
printf '| zstd -d \\| psql (plain pg_dump --clean) | %.2f | %.0f | - |\n' "$b" "$(echo "$rows/$b" | bc -l)"
printf '| ferry-receiver load | %.2f | %.0f | %.1f |\n' "$o" "$(echo "$rows/$o" | bc -l)" "$(echo "$r/1024" | bc -l)"
printf 'ratio ferry/psql: %.2f\n' "$(echo "$o/$b" | bc -l)"
for t in pgbench_accounts events; do
  a=$("${psql[@]}" -d src -Atc "SELECT md5(string_agg(x::text, '' ORDER BY x::text)) FROM $t x")
  c=$("${psql[@]}" -d viz -Atc "SELECT md5(string_agg(x::text, '' ORDER BY x::text)) FROM $t x")
  [ "$a" = "$c" ] && echo "check: $t identical" || echo "check: $t DIFFERS"
done
