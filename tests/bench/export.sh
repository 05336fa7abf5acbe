#!/usr/bin/env bash
# Export benchmark (prints figures; asserts nothing): `ferry-receiver export
# --format parquet` of a database of about $SCALE × 15 MB (pgbench, plus
# $EVENTS jsonb rows), beside `psql \copy … TO … CSV` of the same tables,
# interleaved, $RUNS rounds, medians and the ratio; the Parquet files' size
# against `zstd -3` of the CSV; ferry's peak RSS.
# Usage: bash tests/bench/export.sh   (SCALE=60 EVENTS=1000000 RUNS=3)
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/needs.sh
SCALE=${SCALE:-60}; EVENTS=${EVENTS:-1000000}; RUNS=${RUNS:-3}
cargo build -q --release --bins
receiver=$PWD/target/release/ferry-receiver
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d /var/tmp/ferry-expbench.XXXXXX)
as=(); [ "$(id -u)" = 0 ] && { chown postgres "$work"; as=(runuser -u postgres --); }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { "${as[@]}" "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
"${as[@]}" "$pgbin/initdb" -D "$work/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
"${as[@]}" "$pgbin/pg_ctl" -D "$work/data" -l "$work/log" -w -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$work -c shared_buffers=512MB -c max_wal_size=8GB" start >/dev/null
psql=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres)
"${psql[@]}" -c "CREATE DATABASE viz"
echo "# loading pgbench scale $SCALE and $EVENTS events ..."
"$pgbin/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$port" -U postgres viz 2>/dev/null
"${psql[@]}" -d viz -c "CREATE TABLE events (id bigserial PRIMARY KEY, kind text, payload jsonb, at timestamptz NOT NULL DEFAULT now())" \
  -c "INSERT INTO events (kind, payload) SELECT 'k' || (g % 10), jsonb_build_object('user', g, 'tags', jsonb_build_array('a', 'b', g % 7), 'note', md5(g::text)) FROM generate_series(1, $EVENTS) g" \
  -c "VACUUM ANALYZE"
size=$("${psql[@]}" -d viz -Atc "SELECT pg_size_pretty(pg_database_size('viz'))")
mkdir -p "$work/state" "$work/inbox"
chmod 0777 "$work"
cat > "$work/receiver.toml" <<TOML
state_dir = "$work/state"
inbox = "$work/inbox"
[target]
url = "postgres://postgres@127.0.0.1:$port/viz"
TOML
tables=(pgbench_accounts pgbench_branches pgbench_tellers pgbench_history events)
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now() { date +%s.%N; }
f=(); c=(); rss=()
for r in $(seq "$RUNS"); do
  rm -rf "$work/pq" "$work/csv"; mkdir -p "$work/csv"; sync
  s=$(now)
  /usr/bin/time -f '%M' -o "$work/rss" "$receiver" --config "$work/receiver.toml" export --to "$work/pq" >/dev/null
  f+=("$(echo "$(now) - $s" | bc)"); rss+=("$(cat "$work/rss")")
  sync
  s=$(now)
  for t in "${tables[@]}"; do "${psql[@]}" -d viz -c "\\copy $t TO '$work/csv/$t.csv' CSV"; done
  c+=("$(echo "$(now) - $s" | bc)")
  echo "# round $r: ferry ${f[-1]} s, psql \\copy ${c[-1]} s"
done
pq_bytes=$(du -cb "$work"/pq/*.parquet | tail -1 | cut -f1)
csv_bytes=$(du -cb "$work"/csv/*.csv | tail -1 | cut -f1)
zstd -q -3 -T1 "$work"/csv/*.csv
zst_bytes=$(du -cb "$work"/csv/*.zst | tail -1 | cut -f1)
fm=$(printf '%s\n' "${f[@]}" | median); cm=$(printf '%s\n' "${c[@]}" | median)
echo
echo "## export of a $size database (pgbench scale $SCALE + $EVENTS jsonb events; median of $RUNS, $(nproc) cores)"
echo "| ferry export (Parquet, zstd) | psql \\copy … CSV | ratio | Parquet bytes | CSV bytes | CSV zstd -3 bytes | Parquet ÷ CSV zstd -3 | ferry peak RSS |"
echo "|---|---|---|---|---|---|---|---|"
printf '| %.2f s | %.2f s | **%.2f** | %s | %s | %s | %.2f | %d MiB |\n' "$fm" "$cm" "$(echo "$fm / $cm" | bc -l)" \
  "$pq_bytes" "$csv_bytes" "$zst_bytes" "$(echo "$pq_bytes / $zst_bytes" | bc -l)" \
  "$(( $(printf '%s\n' "${rss[@]}" | sort -n | tail -1) / 1024 ))"
