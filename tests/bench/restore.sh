#!/usr/bin/env bash
# Restore benchmark (prints figures; asserts nothing): `ferry-receiver restore`
# of the latest point (a complete plus $PARTIALS partials) into an empty
# database, beside `pg_restore -j2` of a `pg_dump -Fc` of the same data into
# another empty database, interleaved, $RUNS rounds, medians and the ratio, and
# ferry's peak RSS. Both copies are checked against the source.
# Usage: bash tests/bench/restore.sh   (SCALE=50 EVENTS=2000000 PARTIALS=3 RUNS=3)
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/needs.sh
SCALE=${SCALE:-50}; EVENTS=${EVENTS:-2000000}; PARTIALS=${PARTIALS:-3}; RUNS=${RUNS:-3}
[ -x /usr/bin/time ] || apt-get install -y -q time >/dev/null
cargo build -q --release --bins
sender=$PWD/target/release/ferry-sender; receiver=$PWD/target/release/ferry-receiver
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d /tmp/ferry-restbench.XXXXXX)
as=(); [ "$(id -u)" = 0 ] && { chown postgres "$work"; as=(runuser -u postgres --); }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { "${as[@]}" "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
"${as[@]}" "$pgbin/initdb" -D "$work/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
"${as[@]}" "$pgbin/pg_ctl" -D "$work/data" -l "$work/log" -w -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$work -c shared_buffers=512MB -c max_wal_size=8GB -c maintenance_work_mem=256MB" start >/dev/null
psql=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres)
url() { echo "postgres://postgres@127.0.0.1:$port/$1"; }
"${psql[@]}" -c "CREATE DATABASE src"
echo "# loading pgbench scale $SCALE and $EVENTS events ..."
"$pgbin/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$port" -U postgres src 2>/dev/null
"${psql[@]}" -d src -c "CREATE TABLE events (id bigserial PRIMARY KEY, kind text, payload jsonb, updated_at timestamptz NOT NULL DEFAULT now())" \
  -c "INSERT INTO events (kind, payload) SELECT 'k' || (g % 10), jsonb_build_object('user', g, 'tags', jsonb_build_array('a', 'b', g % 7), 'note', md5(g::text)) FROM generate_series(1, $EVENTS) g" \
  -c "CREATE INDEX ON events (updated_at)" -c "VACUUM ANALYZE"
cat > "$work/sender.toml" <<TOML
sender_id = "bench"
state_dir = "$work/sstate"
[source]
url = "$(url src)"
include = ["public.pgbench_*", "public.events"]
[partial]
change_column = "updated_at"
overlap = "0s"
[partial.tables."public.pgbench_*"]
partial = "complete"
TOML
echo "# a complete and $PARTIALS partials ..."
RUST_LOG=warn "$sender" --config "$work/sender.toml" complete >/dev/null
for i in $(seq "$PARTIALS"); do
  "${psql[@]}" -d src -c "UPDATE events SET kind = 'p$i', updated_at = now() WHERE id % 100 = $i" \
    -c "INSERT INTO events (kind, payload) SELECT 'new$i', '{}' FROM generate_series(1, 1000)" \
    -c "DELETE FROM events WHERE id % 1000 = $i"
  RUST_LOG=warn "$sender" --config "$work/sender.toml" partial >/dev/null
done
"$pgbin/pg_dump" -Fc -h 127.0.0.1 -p "$port" -U postgres -t 'public.pgbench_*' -t public.events -f "$work/dump.fc" src
# Without ferry-sender's delete-capture trigger (its function is not dumped).
"$pgbin/pg_restore" -l "$work/dump.fc" | grep -v ferry_capture_delete > "$work/dump.list"
rows=$("${psql[@]}" -d src -Atc "SELECT (SELECT count(*) FROM pgbench_accounts)+(SELECT count(*) FROM pgbench_branches)+(SELECT count(*) FROM pgbench_tellers)+(SELECT count(*) FROM pgbench_history)+(SELECT count(*) FROM events)")

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ferry_s=(); anchor_s=(); rss=()
for i in $(seq "$RUNS"); do
  "${psql[@]}" -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS rf" -c "DROP DATABASE IF EXISTS rp" -c "CREATE DATABASE rf" -c "CREATE DATABASE rp" -c CHECKPOINT
  sync
  s=$(date +%s.%N)
  RUST_LOG=error /usr/bin/time -f '%M' -o "$work/rss" "$receiver" restore --from "$work/sstate/outbox" --into "$(url rf)" >/dev/null
  ferry_s+=("$(echo "$(date +%s.%N) - $s" | bc)"); rss+=("$(cat "$work/rss")")
  "${psql[@]}" -c CHECKPOINT; sync
  s=$(date +%s.%N)
  "$pgbin/pg_restore" -j2 -L "$work/dump.list" -h 127.0.0.1 -p "$port" -U postgres -d rp "$work/dump.fc"
  anchor_s+=("$(echo "$(date +%s.%N) - $s" | bc)")
done
same() {
  local sum="SELECT count(*), sum(hashtext(e::text)::bigint) FROM events e" a b
  a=$("${psql[@]}" -d src -At -c "$sum"); b=$("${psql[@]}" -d "$1" -At -c "$sum")
  [ "$a" = "$b" ] && echo "$1 equals the source" || echo "WARNING: $1 differs from the source"
}
f=$(printf '%s\n' "${ferry_s[@]}" | median); a=$(printf '%s\n' "${anchor_s[@]}" | median)
echo
echo "## restore of the latest point: $rows rows (pgbench scale $SCALE, $EVENTS events; a complete and $PARTIALS partials), median of $RUNS, $(nproc) cores"
printf '| ferry-receiver restore s | pg_restore -j2 s | ratio | ferry peak RSS MiB |\n|---|---|---|---|\n'
printf '| %.2f | %.2f | %.2f | %.0f |\n' "$f" "$a" "$(echo "$f / $a" | bc -l)" "$(echo "$(printf '%s\n' "${rss[@]}" | sort -n | tail -1) / 1024" | bc -l)"
echo "rounds (s): ferry ${ferry_s[*]} | pg_restore ${anchor_s[*]}"
echo "$(same rf); $(same rp)"
