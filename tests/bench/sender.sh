#!/usr/bin/env bash
# Sender benchmark (prints figures; asserts nothing):
#  1. complete-bundle throughput (rows/s, MB/s, peak RSS) beside `pg_dump | zstd -3 -T2`
#     of the same tables: pgbench scale $SCALE plus $EVENTS rows with jsonb;
#  2. the time of a partial with 10 and with 10,000 changed rows in a $BIG-row table.
# Runs a throwaway PostgreSQL cluster on a free loopback port (as 'postgres' when root).
# Usage: bash tests/bench/sender.sh   (SCALE=50 EVENTS=2000000 BIG=5000000 RUNS=3)
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/needs.sh
SCALE=${SCALE:-50}; EVENTS=${EVENTS:-2000000}; BIG=${BIG:-5000000}; RUNS=${RUNS:-3}
cargo build -q --release --bins
bin=$PWD/target/release/ferry-sender
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d /tmp/ferry-bench.XXXXXX)
as=(); [ "$(id -u)" = 0 ] && { chown postgres "$work"; as=(runuser -u postgres --); }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { "${as[@]}" "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
"${as[@]}" "$pgbin/initdb" -D "$work/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
"${as[@]}" "$pgbin/pg_ctl" -D "$work/data" -l "$work/log" -w -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$work -c shared_buffers=512MB -c max_wal_size=4GB" start >/dev/null
psql=(psql -X -q -h 127.0.0.1 -p "$port" -U postgres)
"${psql[@]}" -c "CREATE DATABASE bench"
echo "# loading pgbench scale $SCALE and $EVENTS events ..."
"$pgbin/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$port" -U postgres bench 2>/dev/null
"${psql[@]}" -d bench <<SQL
CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), kind text,
  payload jsonb, updated_at timestamptz NOT NULL DEFAULT now());
INSERT INTO events (kind, payload) SELECT 'k' || (g % 10),
  jsonb_build_object('user', g, 'tags', jsonb_build_array('a', 'b', g % 7), 'note', md5(g::text))
  FROM generate_series(1, $EVENTS) g;
CREATE TABLE changes (id bigint PRIMARY KEY, v text, updated_at timestamptz NOT NULL);
INSERT INTO changes SELECT g, md5(g::text), '2000-01-01' FROM generate_series(1, $BIG) g;
CREATE INDEX ON changes (updated_at);
VACUUM ANALYZE;
SQL

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
tables=(-t 'public.pgbench_*' -t public.events)
rows=$("${psql[@]}" -d bench -Atc "SELECT (SELECT count(*) FROM pgbench_accounts)+(SELECT count(*) FROM pgbench_branches)+(SELECT count(*) FROM pgbench_tellers)+(SELECT count(*) FROM pgbench_history)+(SELECT count(*) FROM events)")

cat > "$work/complete.toml" <<TOML
sender_id = "bench"
state_dir = "$work/state"
[source]
url = "postgres://postgres@127.0.0.1:$port/bench"
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
# One file per complete: the sizes below are of one bundle file.
[bundle]
volume_bytes = 0
TOML

# Warm the page cache once.
pg_dump -h 127.0.0.1 -p "$port" -U postgres "${tables[@]}" bench >/dev/null
sed 's/^sender_id = "bench"/sender_id = "bench3"/; s#state_dir = .*#state_dir = "'"$work"'/state3"#' "$work/complete.toml" > "$work/complete3.toml"
sed -i 's/^\[bundle\]$/[bundle]\nzstd_level = 3/' "$work/complete3.toml"
base=(); ours=(); rss=(); ours3=(); rss3=()
for i in $(seq "$RUNS"); do
  rm -rf "$work/state3"
  /usr/bin/time -f "%e %M" -o "$work/time" "$bin" --config "$work/complete3.toml" complete >/dev/null 2>"$work/err" || { cat "$work/err"; exit 1; }
  read -r secs kb < "$work/time"
  ours3+=("$secs"); rss3+=("$kb")
  s=$(date +%s.%N)
  pg_dump -h 127.0.0.1 -p "$port" -U postgres "${tables[@]}" bench | zstd -3 -T2 -q > "$work/dump.sql.zst"
  base+=("$(echo "$(date +%s.%N) - $s" | bc)")
  rm -rf "$work/state"
  /usr/bin/time -f "%e %M" -o "$work/time" "$bin" --config "$work/complete.toml" complete >/dev/null 2>"$work/err" || { cat "$work/err"; exit 1; }
  read -r secs kb < "$work/time"
  ours+=("$secs"); rss+=("$kb")
done
bundle=$(ls "$work"/state/outbox/*.tar.zst)
raw=$(tar --zstd -xOf "$bundle" manifest.json | python3 -c 'import json,sys; print(sum(m["size"] for m in json.load(sys.stdin)["members"]))')
b=$(printf '%s\n' "${base[@]}" | median); o=$(printf '%s\n' "${ours[@]}" | median); r=$(printf '%s\n' "${rss[@]}" | sort -n | tail -1)
echo
echo "## complete bundle: $rows rows, $((raw / 1000000)) MB uncompressed, median of $RUNS runs, page cache warm"
printf '| method | s | rows/s | MB/s | compressed MB | peak RSS MiB |\n|---|---|---|---|---|---|\n'
printf '| pg_dump \\| zstd -3 -T2 | %.2f | %.0f | %.0f | %d | - |\n' "$b" "$(echo "$rows/$b" | bc -l)" "$(echo "$raw/1000000/$b" | bc -l)" "$(( $(stat -c %s "$work/dump.sql.zst") / 1000000 ))"
printf '| ferry-sender complete (default: zstd_level = 1) | %.2f | %.0f | %.0f | %d | %.1f |\n' "$o" "$(echo "$rows/$o" | bc -l)" "$(echo "$raw/1000000/$o" | bc -l)" "$(( $(stat -c %s "$bundle") / 1000000 ))" "$(echo "$r/1024" | bc -l)"
o3=$(printf '%s\n' "${ours3[@]}" | median); r3=$(printf '%s\n' "${rss3[@]}" | sort -n | tail -1); b3=$(ls "$work"/state3/outbox/*.tar.zst)
printf '| ferry-sender complete, zstd_level = 3 | %.2f | %.0f | %.0f | %d | %.1f |\n' "$o3" "$(echo "$rows/$o3" | bc -l)" "$(echo "$raw/1000000/$o3" | bc -l)" "$(( $(stat -c %s "$b3") / 1000000 ))" "$(echo "$r3/1024" | bc -l)"
printf 'ratio ferry (default, level 1) / pg_dump|zstd -3 -T2: %.2f\n' "$(echo "$o/$b" | bc -l)"

# Partials in a $BIG-row table, index on the change column.
cat > "$work/partial.toml" <<TOML
sender_id = "bench2"
state_dir = "$work/state2"
[source]
url = "postgres://postgres@127.0.0.1:$port/bench"
include = ["public.changes"]
[partial]
change_column = "updated_at"
overlap = "0s"
deletes = "off"
TOML
"$bin" --config "$work/partial.toml" complete >/dev/null 2>&1
echo
echo "## partial in a $BIG-row table (median of $RUNS runs, whole command: connect, catalog, snapshot, bundle)"
printf '| changed rows | s | peak RSS MiB |\n|---|---|---|\n'
lo=1
for n in 10 10000; do
  ts=(); rs=()
  for i in $(seq "$RUNS"); do
    "${psql[@]}" -d bench -c "UPDATE changes SET v = 'x$i', updated_at = now() WHERE id >= $lo AND id < $((lo + n))"
    lo=$((lo + n))
    /usr/bin/time -f "%e %M" -o "$work/time" "$bin" --config "$work/partial.toml" partial >/dev/null 2>"$work/err" || { cat "$work/err"; exit 1; }
    read -r secs kb < "$work/time"; ts+=("$secs"); rs+=("$kb")
  done
  printf '| %d | %.3f | %.1f |\n' "$n" "$(printf '%s\n' "${ts[@]}" | median)" "$(echo "$(printf '%s\n' "${rs[@]}" | sort -n | tail -1)/1024" | bc -l)"
done
