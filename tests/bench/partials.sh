#!/usr/bin/env bash
# Partials at scale (prints figures; asserts nothing). Needs root (a private
# sshd with a chrooted SFTP-only account, as in the tests).
#
# A PostgreSQL table of $ROWS rows (index on the change column) is copied to the
# receiver once; then, for each size in $SIZES, $RUNS rounds of: update that many
# rows on the source, and
#   - ferry end to end: `ferry-sender partial` (extract, bundle, push over SFTP)
#     then `ferry-receiver load` (verify, stage, apply);
#   - the receiver's load alone (its share of the above);
#   - the anchor: the same bundle's change lines applied as a set by psql to a
#     second copy (COPY into a temporary table, one INSERT … ON CONFLICT DO
#     UPDATE, one DELETE … USING), psql's start-up included;
# interleaved (each ferry round, then the anchor on its bundle), medians printed side by side with
# the ratio, and each agent's peak RSS (from /usr/bin/time) at every size.
# Usage: bash tests/bench/partials.sh   (ROWS=5000000 SIZES="10 10000 1000000" RUNS=3;
#        STEPS_LOG=/tmp/steps.log RUST_LOG=debug keeps each step's log;
#        PG_OPTS="-c wal_compression=lz4" adds server settings)
set -euo pipefail
[ -n "${BENCH_TRACE:-}" ] && set -x
cd "$(dirname "$0")/../.."
source tests/needs.sh
ROWS=${ROWS:-5000000}; SIZES=${SIZES:-"10 10000 1000000"}; RUNS=${RUNS:-3}
[ "$(id -u)" = 0 ] || { echo "run as root: the benchmark starts a private sshd with a chrooted account" >&2; exit 2; }
[ -x /usr/bin/time ] || apt-get install -y -q time >/dev/null
cargo build -q --release --bins
sender=$PWD/target/release/ferry-sender; receiver=$PWD/target/release/ferry-receiver
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d /tmp/ferry-pbench.XXXXXX); ssh_dir=/run/ferry-bench-$$
chown postgres "$work"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port); sport=$(free_port)
cleanup() {
  [ -n "${sshd_pid:-}" ] && kill "$sshd_pid" 2>/dev/null || true
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work" "$ssh_dir"
  userdel ferry-bench 2>/dev/null || true
}
trap cleanup EXIT

# sshd with a chrooted SFTP-only account of its own (usable password field).
id ferry-bench >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin ferry-bench
usermod -p '*' ferry-bench
mkdir -p "$ssh_dir/root/inbox" /run/sshd; chmod 755 "$ssh_dir" "$ssh_dir/root"; chown ferry-bench "$ssh_dir/root/inbox"
ssh-keygen -q -t ed25519 -N '' -C '' -f "$ssh_dir/host_key"; ssh-keygen -q -t ed25519 -N '' -C '' -f "$ssh_dir/client_key"
cp "$ssh_dir/client_key.pub" "$ssh_dir/authorized_keys"
echo "[127.0.0.1]:$sport $(cat "$ssh_dir/host_key.pub")" > "$ssh_dir/known_hosts"
cat > "$ssh_dir/sshd_config" <<CONF
Port $sport
ListenAddress 127.0.0.1
HostKey $ssh_dir/host_key
PidFile none
AuthorizedKeysFile $ssh_dir/authorized_keys
UsePAM no
StrictModes no
PasswordAuthentication no
Subsystem sftp internal-sftp
AllowUsers ferry-bench
Match User ferry-bench
  ChrootDirectory $ssh_dir/root
  ForceCommand internal-sftp
CONF
/usr/sbin/sshd -D -e -f "$ssh_dir/sshd_config" 2>"$work/sshd.log" & sshd_pid=$!
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$sport") 2>/dev/null && break; sleep 0.05; done

runuser -u postgres -- "$pgbin/initdb" -D "$work/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" -l "$work/log" -w -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$work -c shared_buffers=256MB -c max_wal_size=8GB -c maintenance_work_mem=256MB ${PG_OPTS:-}" start >/dev/null
psql=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres)
"${psql[@]}" -c "CREATE DATABASE src" -c "CREATE DATABASE viz" -c "CREATE DATABASE anchor"
echo "# building $ROWS rows ..."
"${psql[@]}" -d src \
  -c "CREATE TABLE t (id bigint PRIMARY KEY, account int NOT NULL, label text, amount numeric(12,2), payload jsonb, updated_at timestamptz NOT NULL DEFAULT now())" \
  -c "INSERT INTO t SELECT g, g % 1000, 'label ' || g, g * 0.01, jsonb_build_object('g', g, 'tag', md5(g::text)), '2020-01-01' FROM generate_series(1, $ROWS) g" \
  -c "CREATE INDEX ON t (updated_at)" -c "VACUUM ANALYZE t"

cat > "$work/sender.toml" <<TOML
sender_id = "bench"
state_dir = "$work/sstate"
[source]
url = "postgres://postgres@127.0.0.1:$port/src"
[partial]
change_column = "updated_at"
overlap = "0s"
[push]
host = "127.0.0.1"
port = $sport
user = "ferry-bench"
key_file = "$ssh_dir/client_key"
known_hosts = "$ssh_dir/known_hosts"
remote_dir = "inbox"
TOML
cat > "$work/receiver.toml" <<TOML
state_dir = "$work/rstate"
inbox = "$ssh_dir/root/inbox"
[target]
url = "postgres://postgres@127.0.0.1:$port/viz"
[retention]
partial = "0s"
TOML
echo "# the first complete ..."
"$sender" --config "$work/sender.toml" complete >/dev/null
"$receiver" --config "$work/receiver.toml" load >/dev/null
"${psql[@]}" -c "DROP DATABASE anchor" -c "CREATE DATABASE anchor TEMPLATE viz"

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# `timed FILE CMD...`: runs CMD under /usr/bin/time; prints "<wall s> <peak RSS KiB>".
timed() {
  local out=$1; shift
  /usr/bin/time -f '%e %M' -o "$out" "$@" >"$work/step.log" 2>&1 </dev/null \
    || { echo "benchmark step failed: $*" >&2; tail -5 "$work/step.log" >&2; return 1; }
  # STEPS_LOG=<file>: every timed step's own log (RUST_LOG as set), for a
  # breakdown of where the time goes.
  [ -z "${STEPS_LOG:-}" ] || cat "$work/step.log" >> "$STEPS_LOG"
  cat "$out"
}
secs() {
  local s; s=$(date +%s.%N)
  "$@" >"$work/step.log" 2>&1 </dev/null || { echo "benchmark step failed: $*" >&2; tail -5 "$work/step.log" >&2; return 1; }
  echo "$(date +%s.%N) - $s" | bc
}
# The psql anchor: the newest partial's change lines, applied as a set.
anchor() {
  local bundle=$1 dir=$work/anchor-x
  rm -rf "$dir"; mkdir -p "$dir"
  tar --zstd -xf "$bundle" -C "$dir" data/public.t.jsonl
  cat > "$work/anchor.sql" <<SQL
BEGIN;
CREATE TEMP TABLE l (line text) ON COMMIT DROP;
\copy l FROM '$dir/data/public.t.jsonl' WITH (FORMAT csv, DELIMITER E'\x02', QUOTE E'\x01')
INSERT INTO t SELECT r.* FROM l, json_populate_record(NULL::t, l.line::json -> 'row') r
  WHERE starts_with(l.line, '{"op":"upsert"')
  ON CONFLICT (id) DO UPDATE SET account = EXCLUDED.account, label = EXCLUDED.label,
    amount = EXCLUDED.amount, payload = EXCLUDED.payload, updated_at = EXCLUDED.updated_at;
DELETE FROM t USING (SELECT r.* FROM l, json_populate_record(NULL::t, l.line::json -> 'key') r
  WHERE starts_with(l.line, '{"op":"delete"')) d WHERE t.id = d.id;
COMMIT;
SQL
  "${psql[@]}" -d anchor -f "$work/anchor.sql"
}

declare -A e2e load anc srss rrss
for n in $SIZES; do
  for i in $(seq "$RUNS"); do
    step=$(( ROWS / n )); [ "$step" -ge 1 ] || step=1
    # n rows changed: every step-th row, shifted each round; a few deleted.
    "${psql[@]}" -d src -c "UPDATE t SET label = 'r$i ' || id, amount = amount + 1, updated_at = now() WHERE id % $step = $i % $step AND id <= $step * $n" \
      -c "DELETE FROM t WHERE id IN (SELECT id FROM t WHERE id % $step = $i % $step AND id <= $step * $n ORDER BY id LIMIT greatest(1, $n / 100))"
    "${psql[@]}" -c CHECKPOINT; sync
    run_ferry() {
      local s=$(date +%s.%N) a b
      a=$(timed "$work/t1" "$sender" --config "$work/sender.toml" partial)
      b=$(timed "$work/t2" "$receiver" --config "$work/receiver.toml" load)
      e2e[$n]+="$(echo "$(date +%s.%N) - $s" | bc) "
      load[$n]+="${b%% *} "; srss[$n]+="${a##* } "; rrss[$n]+="${b##* } "
    }
    run_anchor() {
      # The newest by name (chain, then seq): sent/ files carry the receiver's
      # whole-second delivery time, so their modification times tie.
      local bundle; bundle=$(ls "$work"/sstate/sent/*-partial.tar.zst | sort | tail -1)
      anc[$n]+="$(secs anchor "$bundle") "
    }
    # The anchor needs the bundle ferry made, so it runs second, after a
    # checkpoint as ferry's run had.
    run_ferry
    "${psql[@]}" -c CHECKPOINT; sync
    run_anchor
  done
done
# The copies must match the source, or the figures mean nothing.
same() {
  local sum="SELECT count(*), sum(hashtext(t::text)::bigint) FROM t" a b
  a=$("${psql[@]}" -d src -At -c "$sum"); b=$("${psql[@]}" -d "$1" -At -c "$sum")
  [ "$a" = "$b" ] && echo "$1 equals the source" || echo "WARNING: $1 differs from the source"
}
checks="$(same viz); $(same anchor)"

# Catch-up: the receiver was down while the sender made $BACKLOG partials of
# 1,000 rows; its one load applies them in order (one transaction each). Beside
# it, one partial of the same total: the difference is the cost per bundle.
BACKLOG=${BACKLOG:-20}
for i in $(seq "$BACKLOG"); do
  "${psql[@]}" -d src -c "UPDATE t SET label = 'c$i ' || id, updated_at = now() WHERE id % 5000 = $i"
  "$sender" --config "$work/sender.toml" partial >/dev/null
done
"${psql[@]}" -c CHECKPOINT; sync
backlog=$(timed "$work/t3" "$receiver" --config "$work/receiver.toml" load)
"${psql[@]}" -d src -c "UPDATE t SET label = 'one ' || id, updated_at = now() WHERE id % 5000 < $BACKLOG"
"$sender" --config "$work/sender.toml" partial >/dev/null
"${psql[@]}" -c CHECKPOINT; sync
single=$(timed "$work/t4" "$receiver" --config "$work/receiver.toml" load)

echo
echo "## partials of a $ROWS-row table (median of $RUNS; PostgreSQL $("${psql[@]}" -At -c 'SHOW server_version'), $(nproc) cores)"
printf '| changed rows | ferry end to end s | receiver load s | psql set anchor s | load / anchor | sender peak RSS MiB | receiver peak RSS MiB |\n|---|---|---|---|---|---|---|\n'
for n in $SIZES; do
  m() { tr ' ' '\n' <<<"$1" | grep . | median; }
  e=$(m "${e2e[$n]}"); l=$(m "${load[$n]}"); a=$(m "${anc[$n]}")
  s=$(tr ' ' '\n' <<<"${srss[$n]}" | grep . | sort -n | tail -1); r=$(tr ' ' '\n' <<<"${rrss[$n]}" | grep . | sort -n | tail -1)
  printf '| %s | %.2f | %.2f | %.2f | %.2f | %.0f | %.0f |\n' "$n" "$e" "$l" "$a" "$(echo "$l / $a" | bc -l)" "$(echo "$s/1024" | bc -l)" "$(echo "$r/1024" | bc -l)"
done
printf 'catch-up: %s partials of 1,000 rows applied in %.2f s (%.3f s each); one partial of %s rows in %.2f s\n' \
  "$BACKLOG" "${backlog%% *}" "$(echo "${backlog%% *} / $BACKLOG" | bc -l)" "$((BACKLOG * 1000))" "${single%% *}"
echo "rounds (s): $(for n in $SIZES; do echo -n "$n: e2e ${e2e[$n]}| load ${load[$n]}| anchor ${anc[$n]}; "; done)"
echo "$checks; after the catch-up: $(same viz)"

# The embedded default: a SQLite table of $SQLITE_ROWS rows, a partial of
# $SQLITE_CHANGED updated rows, applied by ferry-receiver (one prepared upsert
# per row in one transaction) beside sqlite3 applying the same lines as a set
# (json_extract in one INSERT … ON CONFLICT and one DELETE).
SQLITE_ROWS=${SQLITE_ROWS:-1000000}; SQLITE_CHANGED=${SQLITE_CHANGED:-100000}
if [ "$SQLITE_ROWS" -gt 0 ]; then
  lite=$work/lite; mkdir -p "$lite/inbox"
  sqlite3 "$lite/app.db" "PRAGMA journal_mode = WAL;
    CREATE TABLE t (id INTEGER PRIMARY KEY, account INTEGER NOT NULL, label TEXT, amount REAL, updated_at TEXT NOT NULL);
    WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < $SQLITE_ROWS)
    INSERT INTO t SELECT i, i % 1000, 'label ' || i, i * 0.01, '2020-01-01 00:00:00' FROM g;
    CREATE INDEX t_updated ON t (updated_at);" >/dev/null
  cat > "$lite/sender.toml" <<TOML
sender_id = "lite"
state_dir = "$lite/sstate"
[source]
url = "sqlite://$lite/app.db"
[partial]
change_column = "updated_at"
overlap = "0s"
TOML
  cat > "$lite/receiver.toml" <<TOML
state_dir = "$lite/rstate"
inbox = "$lite/inbox"
[target]
url = "sqlite://$lite/copy.db"
TOML
  "$sender" --config "$lite/sender.toml" complete >/dev/null
  mv "$lite"/sstate/outbox/*.tar.zst "$lite/inbox/"
  "$receiver" --config "$lite/receiver.toml" load >/dev/null
  # .backup, not cp: the copy's newest pages may still be in its WAL file.
  sqlite3 "$lite/copy.db" ".backup '$lite/anchor.db'"
  sqlite3 "$lite/app.db" "UPDATE t SET label = 'new ' || id, updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE id % ($SQLITE_ROWS / $SQLITE_CHANGED) = 0" >/dev/null
  "$sender" --config "$lite/sender.toml" partial >/dev/null
  bundle=$(ls "$lite"/sstate/outbox/*-partial.tar.zst)
  mkdir -p "$lite/x"; tar --zstd -xf "$bundle" -C "$lite/x" data/t.jsonl
  cp "$bundle" "$lite/inbox/"
  sync
  lite_load=$(timed "$work/t5" "$receiver" --config "$lite/receiver.toml" load)
  cat > "$lite/anchor.sql" <<SQL
.mode tabs
CREATE TEMP TABLE l (line TEXT);
.import $lite/x/data/t.jsonl l
BEGIN;
INSERT INTO t SELECT json_extract(line, '\$.row.id'), json_extract(line, '\$.row.account'),
  json_extract(line, '\$.row.label'), json_extract(line, '\$.row.amount'),
  json_extract(line, '\$.row.updated_at')
  FROM l WHERE line LIKE '{"op":"upsert"%'
  ON CONFLICT (id) DO UPDATE SET account = excluded.account, label = excluded.label,
    amount = excluded.amount, updated_at = excluded.updated_at;
DELETE FROM t WHERE id IN (SELECT json_extract(line, '\$.key.id') FROM l WHERE line LIKE '{"op":"delete"%');
COMMIT;
SQL
  lite_anchor=$(secs sqlite3 "$lite/anchor.db" ".read $lite/anchor.sql")
  printf 'SQLite: %s changed rows of %s applied by ferry-receiver load in %.2f s (peak RSS %.0f MiB); sqlite3 as a set: %.2f s; ratio %.2f\n' \
    "$SQLITE_CHANGED" "$SQLITE_ROWS" "${lite_load%% *}" "$(echo "${lite_load##* }/1024" | bc -l)" "$lite_anchor" "$(echo "${lite_load%% *} / $lite_anchor" | bc -l)"
  a=$(sqlite3 "$lite/app.db" "SELECT count(*), sum(length(label)) FROM t"); b=$(sqlite3 "$lite/copy.db" "SELECT count(*), sum(length(label)) FROM t")
  [ "$a" = "$b" ] && echo "the SQLite copy equals the source" || echo "WARNING: the SQLite copy differs"
fi
