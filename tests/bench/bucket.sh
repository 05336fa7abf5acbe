#!/usr/bin/env bash
# Object storage throughput (prints figures; asserts nothing): a complete of
# $GIB GiB of incompressible rows (a SQLite source, `volume_bytes = 0`, so one
# object: a multipart upload), pushed by `ferry-sender push` into s3s-fs on
# loopback and fetched by `ferry-receiver fetch`, against `rclone copy` of the
# same file to and from the same server (each upload a new object; ferry also
# fsyncs what it downloads, rclone does not) — interleaved, $RUNS rounds, medians
# side by side, with each program's peak RSS (GNU time).
# Usage: bash tests/bench/bucket.sh   (GIB=2 RUNS=3)
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/needs.sh
if ! command -v rclone >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "$0: installing rclone (the anchor)"
    apt-get install -y -qq --no-install-recommends rclone >/dev/null
  else
    echo "$0: rclone is missing; sudo apt-get install -y rclone" >&2; exit 1
  fi
fi
GIB=${GIB:-2}; RUNS=${RUNS:-3}
cargo build -q --release --bins
sender=$PWD/target/release/ferry-sender; receiver=$PWD/target/release/ferry-receiver
work=$(mktemp -d /var/tmp/ferry-s3bench.XXXXXX)
s3pid=
trap '[ -n "$s3pid" ] && kill "$s3pid" 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
avail=$(df --output=avail -k "$work" | tail -1)
if [ "$avail" -lt $((GIB * 5 * 1024 * 1024 + 1048576)) ]; then
  echo "$0: $work needs $((GIB * 5 + 1)) GiB free (source, outbox, two buckets, downloads)" >&2; exit 1
fi
key=ferrybenchaccess; secret=ferrybenchsecret0123456789
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/s3/ferry" "$work/s3/rclone" "$work/inbox" "$work/rclone-down"
"${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" --host 127.0.0.1 --port "$port" \
  --access-key "$key" --secret-key "$secret" "$work/s3" >"$work/s3.log" 2>&1 &
s3pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

echo "# a source of $GIB GiB of random blobs ..."
sqlite3 "$work/app.db" "CREATE TABLE blob (id INTEGER PRIMARY KEY, b BLOB, updated_at TEXT NOT NULL);
  WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $((GIB * 1024)))
  INSERT INTO blob SELECT i, randomblob(1048576), '2026-01-01 00:00:00' FROM n;"
printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' "$key" "$secret" > "$work/creds"
bucket() { printf '[bucket]\nurl = "s3://ferry/app"\nendpoint = "http://127.0.0.1:%s"\ncredentials_file = "%s"\n' "$port" "$work/creds"; }
cat > "$work/sender.toml" <<TOML
sender_id = "app"
state_dir = "$work/sstate"
[source]
url = "sqlite://$work/app.db"
[partial]
change_column = "updated_at"
[bundle]
volume_bytes = 0
$(bucket)
TOML
cat > "$work/receiver.toml" <<TOML
state_dir = "$work/rstate"
inbox = "$work/inbox"
[target]
url = "sqlite://$work/copy.db"
$(bucket)
TOML
export RCLONE_CONFIG_BENCH_TYPE=s3 RCLONE_CONFIG_BENCH_PROVIDER=Other \
  RCLONE_CONFIG_BENCH_ENDPOINT="http://127.0.0.1:$port" RCLONE_CONFIG_BENCH_ACCESS_KEY_ID="$key" \
  RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY="$secret" RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE=true \
  RCLONE_CONFIG="$work/rclone.conf"
touch "$work/rclone.conf"
# A CA bundle in the environment is for https; rclone refuses it on plain http.
rclone() { env -u AWS_CA_BUNDLE "$(command -v rclone)" "$@"; }
RUST_LOG=error "$sender" --config "$work/sender.toml" complete --no-push >/dev/null
file=$(ls "$work/sstate/outbox" | grep -- '-complete.tar.zst$')
bytes=$(stat -c %s "$work/sstate/outbox/$file")
echo "# the complete: $file, $bytes bytes"

# Seconds and peak KiB of one command: "s kib".
timed() {
  /usr/bin/time -f '%e %M' -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
  cat "$work/time"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A t m
for r in $(seq "$RUNS"); do
  # ferry up: the bundle back into the outbox, pushed again.
  [ -f "$work/sstate/sent/$file" ] && mv "$work/sstate/sent/$file" "$work/sstate/outbox/$file"
  # Each upload writes a new object (both tools; s3s-fs keeps objects as files).
  rm -rf "$work/s3/ferry/app" "$work/s3/rclone/app"
  read -r s k < <(RUST_LOG=error timed "$sender" --config "$work/sender.toml" push)
  t[fu]+="$s "; m[fu]+="$k "
  src=$(ls "$work"/sstate/sent/"$file" 2>/dev/null || ls "$work/sstate/outbox/$file")
  read -r s k < <(timed env -u AWS_CA_BUNDLE rclone copy --no-check-dest "$src" bench:rclone/app)
  t[ru]+="$s "; m[ru]+="$k "
  # down: an empty inbox and position.
  rm -rf "$work/inbox"/* "$work/rstate/bucket.cursor"
  read -r s k < <(RUST_LOG=error timed "$receiver" --config "$work/receiver.toml" fetch)
  t[fd]+="$s "; m[fd]+="$k "
  rm -rf "$work/rclone-down"/*
  read -r s k < <(timed env -u AWS_CA_BUNDLE rclone copy --no-check-dest "bench:rclone/app/$file" "$work/rclone-down")
  t[rd]+="$s "; m[rd]+="$k "
  cmp -s "$work/inbox/$file" "$work/rclone-down/$file" || { echo "$0: the downloads differ" >&2; exit 1; }
  last() { awk '{print $NF}' <<<"$1"; }
  echo "# round $r: up ferry $(last "${t[fu]}") s, rclone $(last "${t[ru]}") s; down ferry $(last "${t[fd]}") s, rclone $(last "${t[rd]}") s"
done
med() { tr ' ' '\n' <<<"$1" | grep . | median; }
max() { tr ' ' '\n' <<<"$1" | grep . | sort -n | tail -1; }
mib=$(echo "$bytes / 1048576" | bc -l)
echo
echo "## object storage: one $(printf '%.0f' "$mib") MiB complete, s3s-fs on loopback (median of $RUNS; rclone $(rclone version | head -1 | awk '{print $2}'), $(nproc) cores)"
echo "| direction | ferry s | rclone copy s | ferry MiB/s | rclone MiB/s | ferry ÷ rclone throughput | ferry peak RSS MiB | rclone peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|"
for d in u:up d:down; do
  f=${d%%:*}; name=${d#*:}
  ft=$(med "${t[f$f]}"); rt=$(med "${t[r$f]}")
  printf '| %s | %.2f | %.2f | %.0f | %.0f | %.2f | %.0f | %.0f |\n' "$name" "$ft" "$rt" \
    "$(echo "$mib / $ft" | bc -l)" "$(echo "$mib / $rt" | bc -l)" "$(echo "$rt / $ft" | bc -l)" \
    "$(echo "$(max "${m[f$f]}") / 1024" | bc -l)" "$(echo "$(max "${m[r$f]}") / 1024" | bc -l)"
done
