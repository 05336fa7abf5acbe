#!/usr/bin/env bash
# History at scale (prints figures; asserts nothing): `ferry-receiver versions`,
# `prune` (with a retention that keeps everything, so it only decides) and
# `restore --dry-run` (planning a restore of the newest point) with $BUNDLES
# applied bundles in the inbox: a complete every $EVERY bundles, partials
# between. The bundles are hard links to two small real bundles of a SQLite
# sender (a complete and a partial) under generated names, and the ledger
# rows are generated to match, so only the history's size varies.
# Usage: bash tests/bench/history.sh   (BUNDLES=100000 EVERY=288)
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/needs.sh
BUNDLES=${BUNDLES:-100000}; EVERY=${EVERY:-288}
cargo build -q --release --bins
sender=$PWD/target/release/ferry-sender; receiver=$PWD/target/release/ferry-receiver
work=$(mktemp -d /tmp/ferry-hbench.XXXXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
mkdir -p "$work/inbox"
sqlite3 "$work/app.db" "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, updated_at TEXT NOT NULL);
  INSERT INTO t VALUES (1, 'a', '2026-01-01 00:00:00');"
cat > "$work/sender.toml" <<TOML
sender_id = "app"
state_dir = "$work/sstate"
[source]
url = "sqlite://$work/app.db"
[partial]
change_column = "updated_at"
overlap = "0s"
TOML
cat > "$work/receiver.toml" <<TOML
state_dir = "$work/rstate"
inbox = "$work/inbox"
[target]
url = "sqlite://$work/copy.db"
[retention]
keep_completes = 1000000
complete = "3650d"
partial = "3650d"
TOML
RUST_LOG=error "$sender" --config "$work/sender.toml" complete >/dev/null
sqlite3 "$work/app.db" "UPDATE t SET v = 'b', updated_at = '2026-01-02 00:00:00'"
RUST_LOG=error "$sender" --config "$work/sender.toml" partial >/dev/null
cp "$work"/sstate/outbox/*.tar.zst "$work/inbox/"
RUST_LOG=error "$receiver" --config "$work/receiver.toml" load >/dev/null
complete=$(ls "$work"/inbox/*-complete.tar.zst); partial=$(ls "$work"/inbox/*-partial.tar.zst)
name=$(basename "$complete"); chain=${name#app-}; chain=${chain%%-*}
echo "# generating $BUNDLES bundles (a complete every $EVERY) ..."
python3 - "$work/inbox" "$chain" "$BUNDLES" "$EVERY" "$complete" "$partial" <<'PY'
import os, shutil, sys
inbox, chain, n, every, c, p = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
source = {"complete": c, "partial": p}
for seq in range(3, n + 1):
    kind = "complete" if (seq - 1) % every == 0 else "partial"
    dest = f"{inbox}/app-{chain}-{seq:012d}-{kind}.tar.zst"
    try:
        os.link(source[kind], dest)
    except OSError:  # a file system's limit of links to one file: a new copy
        source[kind] = f"{inbox}/../{kind}-{seq}.template"
        shutil.copyfile(c if kind == "complete" else p, source[kind])
        os.link(source[kind], dest)
PY
sqlite3 "$work/copy.db" "WITH RECURSIVE g(s) AS (SELECT 3 UNION ALL SELECT s + 1 FROM g WHERE s < $BUNDLES)
  INSERT INTO ferry_applied (sender_id, chain, seq, kind, base_seq, created_at, file, rows, schema_fingerprint, tables, carried_from)
  SELECT 'app', '$chain', s, CASE WHEN (s - 1) % $EVERY = 0 THEN 'complete' ELSE 'partial' END,
         s - ((s - 1) % $EVERY), strftime('%Y-%m-%dT%H:%M:%SZ', 'now', '+' || s || ' seconds'),
         'app-$chain-' || printf('%012d', s) || '-' || CASE WHEN (s - 1) % $EVERY = 0 THEN 'complete' ELSE 'partial' END || '.tar.zst',
         1, '', json_array('t'), json_array() FROM g"
secs() { local s; s=$(date +%s.%N); "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; return 1; }; echo "$(date +%s.%N) - $s" | bc; }
v=$(secs "$receiver" --config "$work/receiver.toml" versions)
p=$(secs "$receiver" --config "$work/receiver.toml" prune)
r=$(secs "$receiver" --config "$work/receiver.toml" restore --dry-run --into "sqlite://$work/restored.db")
echo
echo "## history of $(ls "$work/inbox" | grep -c tar.zst) bundles (a complete every $EVERY), $(nproc) cores"
printf '| versions s | prune s | restore --dry-run (plan the newest point) s |\n|---|---|---|\n| %.2f | %.2f | %.2f |\n' "$v" "$p" "$r"
