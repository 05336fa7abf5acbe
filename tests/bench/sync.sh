#!/usr/bin/env bash
# Push and whole-sync benchmark (prints figures; asserts nothing). Needs root
# (a private sshd with a chrooted SFTP-only account, as in the tests).
#  1. upload throughput: `ferry-sender push` of one 400 MB bundle-named file
#     beside OpenSSH `sftp` putting the same file to the same account, with
#     fsync (`put -f`, as ferry does) and without;
#  2. a complete sync end to end (dump -> bundle -> push -> load) beside the
#     classic one-liner `pg_dump | zstd -3 -T2 | ssh ... 'zstd -d | psql'`,
#     on the same data (pgbench scale $SCALE plus $EVENTS jsonb rows), refreshing
#     a copy that is already there, as a ratio.
# Usage: bash tests/bench/sync.sh   (SCALE=50 EVENTS=2000000 RUNS=3 MB=400;
#        ONLY=upload or ONLY=sync runs one part). To decide the 0.75 sync target
#        on a shared VM, run RUNS=31 ONLY=sync (~30 min) and read `sign test:`.
set -euo pipefail
[ -n "${BENCH_TRACE:-}" ] && set -x
cd "$(dirname "$0")/../.."
source tests/needs.sh
SCALE=${SCALE:-50}; EVENTS=${EVENTS:-2000000}; RUNS=${RUNS:-3}; MB=${MB:-400}; ONLY=${ONLY:-}
[ "$(id -u)" = 0 ] || { echo "run as root: the benchmark starts a private sshd with a chrooted account" >&2; exit 2; }
cargo build -q --release --bins
sender=$PWD/target/release/ferry-sender; receiver=$PWD/target/release/ferry-receiver
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d /tmp/ferry-sbench.XXXXXX); ssh_dir=/run/ferry-bench-$$
chown postgres "$work"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port); sport=$(free_port)
cleanup() {
  [ -n "${sshd_pid:-}" ] && kill "$sshd_pid" 2>/dev/null || true
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work" "$ssh_dir"
}
trap cleanup EXIT

# sshd: chrooted SFTP-only `ferry-sftp` (as the tests), and root with a shell for the one-liner.
id ferry-sftp >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin --password '*' ferry-sftp
mkdir -p "$ssh_dir/root/inbox" /run/sshd; chmod 755 "$ssh_dir" "$ssh_dir/root"; chown ferry-sftp "$ssh_dir/root/inbox"
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
PermitRootLogin prohibit-password
PasswordAuthentication no
Subsystem sftp internal-sftp
AllowUsers ferry-sftp root
Match User ferry-sftp
  ChrootDirectory $ssh_dir/root
  ForceCommand internal-sftp
CONF
/usr/sbin/sshd -D -e -f "$ssh_dir/sshd_config" 2>"$work/sshd.log" & sshd_pid=$!
common=(-o BatchMode=yes -o UserKnownHostsFile="$ssh_dir/known_hosts" -i "$ssh_dir/client_key")
sftpopt=("${common[@]}" -P "$sport"); sshopt=("${common[@]}" -p "$sport")
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$sport") 2>/dev/null && break; sleep 0.05; done

runuser -u postgres -- "$pgbin/initdb" -D "$work/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" -l "$work/log" -w -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$work -c shared_buffers=512MB -c max_wal_size=8GB -c maintenance_work_mem=256MB" start >/dev/null
psql=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres)
"${psql[@]}" -c "CREATE DATABASE src" -c "CREATE DATABASE viz" -c "CREATE DATABASE base"
echo "# loading pgbench scale $SCALE and $EVENTS events ..."
"$pgbin/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$port" -U postgres src 2>/dev/null
"${psql[@]}" -d src -c "CREATE TABLE events (id bigserial PRIMARY KEY, kind text, payload jsonb, updated_at timestamptz NOT NULL DEFAULT now())" \
  -c "INSERT INTO events (kind, payload) SELECT 'k' || (g % 10), jsonb_build_object('user', g, 'tags', jsonb_build_array('a', 'b', g % 7), 'note', md5(g::text)) FROM generate_series(1, $EVENTS) g" \
  -c "VACUUM ANALYZE"

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
[push]
host = "127.0.0.1"
port = $sport
user = "ferry-sftp"
key_file = "$ssh_dir/client_key"
known_hosts = "$ssh_dir/known_hosts"
remote_dir = "inbox"
TOML
# The SQL hook runs in the load transaction, just before its commit: it records
# when the new copy becomes visible to the receiver's readers.
cat > "$work/receiver.toml" <<TOML
state_dir = "$work/rstate"
inbox = "$ssh_dir/root/inbox"
[target]
url = "postgres://postgres@127.0.0.1:$port/viz"
[[hooks]]
on = ["complete"]
sql = "INSERT INTO bench.visible VALUES (clock_timestamp())"
TOML
"${psql[@]}" -d viz -c "CREATE SCHEMA bench" -c "CREATE TABLE bench.visible (at timestamptz)"

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# `secs CMD...`: its wall seconds; a failed step stops the benchmark (no figure
# from a command that did not do the job).
secs() {
  local s; s=$(date +%s.%N)
  "$@" >"$work/step.log" 2>&1 </dev/null || { echo "benchmark step failed: $*" >&2; tail -5 "$work/step.log" >&2; return 1; }
  echo "$(date +%s.%N) - $s" | bc
}
# CPU-seconds used by the whole machine (every process: servers, ssh, agents).
busy() { awk '/^cpu /{printf "%.2f\n", ($2+$3+$4+$7+$8)/100}' /proc/stat; }
# CPU-seconds the hypervisor took from this VM ("steal"; 0 on bare metal).
stolen() { awk '/^cpu /{printf "%.2f\n", $9/100}' /proc/stat; }
# Each timed run starts from the same state: no dirty data left by the previous
# run for the disk to write back meanwhile, and a quiet machine. On a VM the
# host's own work for big writes shows up as stolen CPU for tens of seconds
# (seen: 1.5 of 10.4 CPU-s stolen around the first upload after the data load,
# ~0 half a minute later), so wait (at most 60 s) for a second with under 5%
# of the cores busy or stolen.
settle() {
  "${psql[@]}" -c CHECKPOINT >/dev/null; sync
  local a b
  for _ in $(seq 60); do
    a=$(echo "$(busy) + $(stolen)" | bc); sleep 1; b=$(echo "$(busy) + $(stolen)" | bc)
    [ "$(echo "($b - $a) < 0.05 * $(nproc)" | bc)" = 1 ] && break
  done
}
# `cpu_secs CMD...`: "<wall s> <machine CPU s>".
cpu_secs() { local b w; b=$(busy); w=$(secs "$@"); echo "$w $(echo "$(busy) - $b" | bc)"; }

# 1. Upload throughput. ferry-sender fsyncs each bundle on the receiver before it
# lets it go (fsync@openssh.com), so the like-for-like baseline is `put -f`, which
# fsyncs too; plain `put` (no fsync) is shown beside it. Every timed upload starts
# with no dirty pages left by the previous one nor by the data load above
# (`settle`: a checkpoint, then `sync`), and the three take turns going first.
if [ "$ONLY" != sync ]; then
  mkdir -p "$work/sstate/outbox"
  head -c "$((MB << 20))" /dev/urandom > "$work/blob"
  echo "put -f $work/blob inbox/blob" > "$work/batch-f"
  echo "put $work/blob inbox/blob" > "$work/batch"
  ferry_up=(); sftpf_up=(); sftp_up=()
  # `upload ARRAY CMD...`: one settled, timed upload, its seconds added to ARRAY.
  # The stolen CPU-seconds during each run go into steal_up, to be printed.
  steal_up=()
  upload() {
    local -n into=$1; local label=${1%_up} st; shift
    settle; st=$(stolen); into+=("$(secs "$@")")
    steal_up+=("$label:$(echo "$(stolen) - $st" | bc)")
    rm -f "$ssh_dir"/root/inbox/* "$work"/sstate/sent/*
  }
  # A hard link: ferry reads the very file (and page-cache pages) sftp reads. A
  # copy made just before the run added a 400 MB write, and its flush, that
  # only ferry's runs paid for.
  up_ferry() {
    ln "$work/blob" "$work/sstate/outbox/bench-$(printf %012d $((900 + i)))-partial.tar.zst"
    upload ferry_up "$sender" --config "$work/sender.toml" push
  }
  up_sftpf() { upload sftpf_up sftp -q -b "$work/batch-f" "${sftpopt[@]}" ferry-sftp@127.0.0.1; }
  up_sftp() { upload sftp_up sftp -q -b "$work/batch" "${sftpopt[@]}" ferry-sftp@127.0.0.1; }
  order=(up_ferry up_sftpf up_sftp)
  for i in $(seq "$RUNS"); do # up_ferry names its bundle after $i
    for k in 0 1 2; do "${order[$(((i + k) % 3))]}"; done
  done
  fu=$(printf '%s\n' "${ferry_up[@]}" | median)
  sfu=$(printf '%s\n' "${sftpf_up[@]}" | median); su=$(printf '%s\n' "${sftp_up[@]}" | median)
  mbs() { echo "$MB*1.048576/$1" | bc -l; }
  echo
  echo "## upload of a $MB MiB bundle over SFTP (loopback, median of $RUNS)"
  printf '| client | s | MB/s |\n|---|---|---|\n'
  printf '| OpenSSH sftp `put -f` (fsync, as ferry) | %.2f | %.0f |\n' "$sfu" "$(mbs "$sfu")"
  printf '| OpenSSH sftp `put` (no fsync) | %.2f | %.0f |\n' "$su" "$(mbs "$su")"
  printf '| ferry-sender push | %.2f | %.0f |\n' "$fu" "$(mbs "$fu")"
  printf 'ferry/sftp throughput: %.2f (against put -f), %.2f (against put)\n' \
    "$(echo "$sfu/$fu" | bc -l)" "$(echo "$su/$fu" | bc -l)"
  echo "runs: put -f ${sftpf_up[*]}; put ${sftp_up[*]}; ferry ${ferry_up[*]}"
  echo "CPU-s stolen by the hypervisor during each run, in order: ${steal_up[*]}"
fi
[ "$ONLY" = upload ] && exit 0

# 2. A complete sync end to end; both targets hold a copy first.
oneliner() {
  pg_dump --clean --if-exists -h 127.0.0.1 -p "$port" -U postgres -t 'public.pgbench_*' -t public.events src \
    | zstd -3 -T2 -q | ssh "${sshopt[@]}" root@127.0.0.1 "zstd -d -q | psql -X -q -h 127.0.0.1 -p $port -U postgres -d base" >/dev/null 2>&1
}
# The receiver starts when the complete's first file lands in its inbox, as its
# daemon does on the inbox event: with the complete sent in volumes (the
# default), it loads while the sender still dumps.
ferry_sync() {
  local inbox="$ssh_dir/root/inbox" before sp
  before=$(ls "$inbox" | wc -l)
  "$sender" --config "$work/sender.toml" complete >/dev/null 2>&1 & sp=$!
  until [ "$(ls "$inbox" | wc -l)" -gt "$before" ]; do kill -0 "$sp" 2>/dev/null || break; sleep 0.02; done
  "$receiver" --config "$work/receiver.toml" load >/dev/null 2>&1 || { wait "$sp"; return 1; }
  wait "$sp"
}
# The same, one after the other: the receiver starts once the sender is done.
ferry_after() {
  "$sender" --config "$work/sender.toml" complete >/dev/null 2>&1 && "$receiver" --config "$work/receiver.toml" load >/dev/null 2>&1
}
oneliner || { echo "the one-liner failed (see $work/sshd.log)" >&2; exit 1; }
ferry_sync || { echo "ferry sync failed" >&2; exit 1; }
one=(); fer=(); vis=(); aft=()
for i in $(seq "$RUNS"); do
  settle; one+=("$(secs oneliner)")
  settle; t0=$(date +%s.%N); fer+=("$(secs ferry_sync)")
  vis+=("$(echo "$("${psql[@]}" -d viz -Atc "SELECT extract(epoch FROM max(at)) FROM bench.visible") - $t0" | bc)")
  settle; aft+=("$(secs ferry_after)")
done
o=$(printf '%s\n' "${one[@]}" | median); f=$(printf '%s\n' "${fer[@]}" | median)
v=$(printf '%s\n' "${vis[@]}" | median); a=$(printf '%s\n' "${aft[@]}" | median)
echo
echo "## complete sync end to end (pgbench scale $SCALE + $EVENTS events, refresh, median of $RUNS)"
printf '| method | s |\n|---|---|\n'
printf '| pg_dump \\| zstd -3 -T2 \\| ssh ... '"'"'zstd -d \\| psql'"'"' | %.2f |\n' "$o"
printf '| ferry-sender complete (push) with ferry-receiver load started on its first volume | %.2f |\n' "$f"
printf '| the same, until the new copy is visible on the receiver (its commit) | %.2f |\n' "$v"
printf '| ferry-sender complete (push), then ferry-receiver load | %.2f |\n' "$a"
printf 'ratio ferry/one-liner: %.2f (both commands done), %.2f (new copy visible), %.2f (one after the other)\n' \
  "$(echo "$f/$o" | bc -l)" "$(echo "$v/$o" | bc -l)" "$(echo "$a/$o" | bc -l)"
echo "runs: one-liner ${one[*]}; ferry ${fer[*]}; visible ${vis[*]}; one after the other ${aft[*]}"
# Each round's ferry run against the one-liner run just before it: on a shared
# 2-core VM the spread of these is wider than the target's margin (seen:
# 0.58-0.94 over 15 rounds), so print it beside the ratio of medians. Then how
# sure that is: a one-sided sign test of "the median round is above 0.75" (the
# chance of this many rounds at or under 0.75 if it were), and the
# distribution-free ~95% interval of the median round (order statistics).
pairs=$(for k in "${!one[@]}"; do echo "${fer[$k]} / ${one[$k]}" | bc -l; done)
python3 - $pairs <<'PY'
import math, sys
r = sorted(float(x) for x in sys.argv[1:])
n, k = len(r), sum(x <= 0.75 for x in r)
print(f"ratio per round, sorted: {' '.join(f'{x:.2f}' for x in r)} "
      f"(median {r[(n + 1) // 2 - 1]:.2f}; {k} of {n} at most 0.75)")
p = sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n
lo, c = 0, 0.0
while c + math.comb(n, lo) / 2**n <= 0.025:
    c += math.comb(n, lo) / 2**n
    lo += 1
if lo == 0:
    print(f"sign test: p = {p:.3f} ({k} of {n} rounds at most 0.75); too few rounds for an interval")
else:
    print(f"sign test: p = {p:.3f} ({k} of {n} rounds at most 0.75); "
          f"median round in [{r[lo - 1]:.2f}, {r[n - lo]:.2f}] with {1 - 2 * c:.0%} confidence")
PY
# Where ferry's time goes: one more sync, stage by stage.
settle; o1=($(cpu_secs oneliner))
settle; c=($(cpu_secs "$sender" --config "$work/sender.toml" complete --no-push))
p=($(cpu_secs "$sender" --config "$work/sender.toml" push))
b=$(busy); s=$(date +%s.%N)
RUST_LOG=info "$receiver" --config "$work/receiver.toml" load 2>"$work/load.log" >/dev/null
l=("$(echo "$(date +%s.%N) - $s" | bc)" "$(echo "$(busy) - $b" | bc)")
printf 'one-liner: %.2f s wall, %.2f CPU-s (all processes)\n' "${o1[0]}" "${o1[1]}"
printf 'stages (wall s / CPU-s): complete %.2f / %.2f, push %.2f / %.2f, load %.2f / %.2f\n' \
  "${c[0]}" "${c[1]}" "${p[0]}" "${p[1]}" "${l[0]}" "${l[1]}"
# The floor: the CPU work ferry's stages need, spread perfectly over every core,
# with the stages overlapped; no scheduling can beat it, only doing less work.
cores=$(nproc); work_s=$(echo "${c[1]} + ${p[1]} + ${l[1]}" | bc)
printf 'CPU floor: %.2f CPU-s on %d cores = %.2f s at best, ratio %.2f at best (the one-liner used %.2f CPU-s in %.2f s)\n' \
  "$work_s" "$cores" "$(echo "$work_s/$cores" | bc -l)" "$(echo "$work_s/$cores/${o1[0]}" | bc -l)" "${o1[1]}" "${o1[0]}"
grep -E 'ms=|duration_ms=' "$work/load.log" | sed -E 's/\x1b\[[0-9;]*m//g; s/^.*(INFO|WARN) [^ ]+ //; s/^/  load: /' || true
for t in pgbench_accounts events; do
  a=$("${psql[@]}" -d src -Atc "SELECT md5(string_agg(x::text, ',' ORDER BY x::text)) FROM $t x")
  b=$("${psql[@]}" -d viz -Atc "SELECT md5(string_agg(x::text, ',' ORDER BY x::text)) FROM $t x")
  [ "$a" = "$b" ] && echo "check: $t identical" || echo "check: $t DIFFERS"
done
