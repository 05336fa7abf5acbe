#!/usr/bin/env bash
# Completes that carry unchanged tables (prints figures; asserts nothing).
# $TABLES equal tables of $TROWS rows each; every round updates one row of one
# table, then takes, interleaved, a full complete (a sender with
# `[complete] carry_unchanged = 0`) and a carrying complete (a second sender on
# the same database, default settings, which took one complete before the
# rounds): wall time and bundle bytes of each, medians of $RUNS rounds, and
# the ratios. Both bundles are then loaded into two receivers' databases and
# compared with the source.
# Usage: bash tests/bench/carry.sh   (TABLES=10 TROWS=1000000 RUNS=3;
#        STEPS_LOG=/tmp/steps.log keeps the senders' info logs)
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/needs.sh
TABLES=${TABLES:-10}; TROWS=${TROWS:-1000000}; RUNS=${RUNS:-3}
cargo build -q --release --bins
sender=$PWD/target/release/ferry-sender; receiver=$PWD/target/release/ferry-receiver
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d /tmp/ferry-carrybench.XXXXXX)
as=(); [ "$(id -u)" = 0 ] && { chown postgres "$work"; as=(runuser -u postgres --); }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { "${as[@]}" "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
"${as[@]}" "$pgbin/initdb" -D "$work/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
"${as[@]}" "$pgbin/pg_ctl" -D "$work/data" -l "$work/log" -w -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$work -c shared_buffers=512MB -c max_wal_size=8GB" start >/dev/null
psql=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres)
url() { echo "postgres://postgres@127.0.0.1:$port/$1"; }
"${psql[@]}" -c "CREATE DATABASE src" -c "CREATE DATABASE full_copy" -c "CREATE DATABASE carry_copy"
echo "# $TABLES tables of $TROWS rows ..."
for t in $(seq 0 $((TABLES - 1))); do
  "${psql[@]}" -d src -c "CREATE TABLE t$t (id bigint PRIMARY KEY, account int NOT NULL, label text,
      amount numeric(12,2), created timestamptz NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())" \
    -c "INSERT INTO t$t SELECT g, g % 1000, 'label ' || md5(g::text), g * 0.01, '2020-01-01'::timestamptz + g * interval '1 s', '2020-01-01' FROM generate_series(1, $TROWS) g" \
    -c "CREATE INDEX ON t$t (updated_at)"
done
"${psql[@]}" -d src -c "VACUUM ANALYZE"
for kind in full carry; do
  mkdir -p "$work/$kind-inbox"
  cat > "$work/$kind.toml" <<TOML
sender_id = "$kind"
state_dir = "$work/$kind-state"
[source]
url = "$(url src)"
[partial]
change_column = "updated_at"
[complete]
carry_unchanged = $([ $kind = full ] && echo 0 || echo 100)
TOML
  cat > "$work/$kind-receiver.toml" <<TOML
state_dir = "$work/$kind-rstate"
inbox = "$work/$kind-inbox"
[target]
url = "$(url ${kind}_copy)"
TOML
done
RUST_LOG=warn "$sender" --config "$work/carry.toml" complete --no-push >/dev/null

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
newest() { ls -t "$1"/*-complete.tar.zst | head -1; }
# Every file of the newest complete (a large one is a volume set).
files_of_newest() { local f; f=$(newest "$1"); ls "${f%.tar.zst}".*tar.zst; }
full_s=(); carry_s=(); full_b=(); carry_b=(); level=warn; [ -n "${STEPS_LOG:-}" ] && level=info
for i in $(seq "$RUNS"); do
  "${psql[@]}" -d src -c "UPDATE t$((i % TABLES)) SET label = 'round $i', updated_at = now() WHERE id = $i" -c CHECKPOINT
  for kind in full carry; do
    s=$(date +%s.%N)
    RUST_LOG=$level "$sender" --config "$work/$kind.toml" complete --no-push \
      >/dev/null 2>>"${STEPS_LOG:-/dev/stderr}"
    e=$(echo "$(date +%s.%N) - $s" | bc)
    b=$(files_of_newest "$work/$kind-state/outbox" | xargs stat -c %s | paste -sd+ | bc)
    if [ $kind = full ]; then full_s+=("$e"); full_b+=("$b"); else carry_s+=("$e"); carry_b+=("$b"); fi
  done
  # Only the newest full complete is kept (disk); the carrying sender keeps
  # its history (its completes carry from the first).
  keep=$(files_of_newest "$work/full-state/outbox")
  for f in "$work/full-state/outbox"/*.tar.zst; do grep -qxF "$f" <<<"$keep" || rm -f "$f"; done
done
# Both newest completes load into copies equal to the source.
cp $(files_of_newest "$work/full-state/outbox") "$work/full-inbox/"
cp "$work/carry-state/outbox"/*.tar.zst "$work/carry-inbox/"
for kind in full carry; do
  s=$(date +%s.%N)
  RUST_LOG=warn "$receiver" --config "$work/$kind-receiver.toml" load >/dev/null
  echo "# $kind: the receiver loaded it in $(echo "$(date +%s.%N) - $s" | bc) s"
done
same() {
  local sum a b t ok=yes
  for t in $(seq 0 $((TABLES - 1))); do
    sum="SELECT count(*), sum(hashtext(x::text)::bigint) FROM t$t x"
    a=$("${psql[@]}" -d src -At -c "$sum"); b=$("${psql[@]}" -d "$1" -At -c "$sum")
    [ "$a" = "$b" ] || ok=no
  done
  [ $ok = yes ] && echo "$1 equals the source" || echo "WARNING: $1 differs from the source"
}
fs=$(printf '%s\n' "${full_s[@]}" | median); cs=$(printf '%s\n' "${carry_s[@]}" | median)
fb=$(printf '%s\n' "${full_b[@]}" | median); cb=$(printf '%s\n' "${carry_b[@]}" | median)
echo
echo "## a complete when 1 of $TABLES tables ($TROWS rows each) changed, median of $RUNS, $(nproc) cores"
printf '| | full complete | carrying complete | ratio |\n|---|---|---|---|\n'
printf '| sender wall time, s | %.2f | %.2f | %.3f |\n' "$fs" "$cs" "$(echo "$cs / $fs" | bc -l)"
printf '| bundle bytes | %d | %d | %.3f |\n' "$fb" "$cb" "$(echo "$cb / $fb" | bc -l)"
echo "rounds (s): full ${full_s[*]} | carrying ${carry_s[*]}"
echo "$(same full_copy); $(same carry_copy)"
