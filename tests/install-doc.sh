#!/usr/bin/env bash
# Follows docs/install.md as written on this machine: every ```sh block, in
# order, as root, with only these changes (printed as they apply):
#   - `cargo build --release …` is skipped and `target/release/` is the
#     binaries this test suite built (BIN_DIR, default target/debug);
#   - the receiver is this machine (127.0.0.1, the embedded SFTP endpoint on
#     a free port), and the sender's real public key replaces `AAAA…`;
#   - `sudoedit` writes a small working configuration (EDITOR below);
#   - without systemd as PID 1, `systemctl enable --now <unit>` starts the
#     unit's ExecStart as its User= (and `stop` stops it).
# Then a row made in the app reaches the copy, both `status` exit 0, and
# everything the doc installed is removed again. Needs root and sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "$0: run as root (it installs into /usr/bin and /etc)" >&2; exit 1; }
command -v sudo >/dev/null || { echo "$0: needs sudo (apt-get install -y sudo)" >&2; exit 1; }
BIN_DIR=$(realpath "${BIN_DIR:-target/debug}")
[ -x "$BIN_DIR/ferry-sender" ] || { echo "$0: no binaries in $BIN_DIR; cargo build --bins first" >&2; exit 1; }
if [ -e /etc/ferry ] || [ -e /usr/bin/ferry-sender ] || id ferry-sender >/dev/null 2>&1; then
  echo "$0: ferry is already installed on this machine (/etc/ferry, /usr/bin/ferry-sender or user ferry-sender); this test installs and removes it, so run it on a scratch machine" >&2
  exit 1
fi
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
WORK=$(mktemp -d /tmp/ferry-install-doc.XXXXXX)
export FERRY_DOC_WORK=$WORK FERRY_DOC_PORT=$PORT

uninstall() {
  for pid in "$WORK"/*.pid; do [ -e "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true; done
  sleep 0.5
  rm -rf /usr/bin/ferry-sender /usr/bin/ferry-receiver /etc/ferry /etc/sysusers.d/ferry-sender.sysusers.conf /etc/sysusers.d/ferry-receiver.sysusers.conf \
    /etc/tmpfiles.d/ferry-sender.tmpfiles.conf /etc/tmpfiles.d/ferry-receiver.tmpfiles.conf /etc/systemd/system/ferry-sender.service \
    /etc/systemd/system/ferry-receiver.service /var/lib/ferry-sender /var/lib/ferry-receiver \
    /srv/ferry /srv/ferry-doc-app
  for u in ferry-sender ferry-receiver; do
    id "$u" >/dev/null 2>&1 && userdel "$u" 2>/dev/null || true
    getent group "$u" >/dev/null && groupdel "$u" 2>/dev/null || true
  done
  rmdir /srv 2>/dev/null || true
  [ -n "${SHIMMED:-}" ] && rm -f /usr/local/sbin/systemctl
  rm -f /etc/systemd/system/multi-user.target.wants/ferry-sender.service \
    /etc/systemd/system/multi-user.target.wants/ferry-receiver.service
}
trap 'status=$?; set +e; [ $status = 0 ] || { echo "--- daemon logs"; cat "$WORK"/*.log 2>/dev/null; }; uninstall; rm -rf "$WORK"; exit $status' EXIT

# The editor sudoedit runs: a working configuration for each file.
cat > "$WORK/editor" <<'ED'
#!/usr/bin/env bash
case "$(basename "$1")" in
  receiver*) cat > "$1" <<CFG
state_dir = "/var/lib/ferry-receiver"
inbox = "/srv/ferry/inbox"
[target]
url = "sqlite:///var/lib/ferry-receiver/copy.sqlite3"
[sftp_server]
listen = "127.0.0.1:$FERRY_DOC_PORT"
host_key = "/var/lib/ferry-receiver/sftp_host_ed25519_key"
authorized_keys = "/etc/ferry/authorized_keys"
CFG
  ;;
  sender*) cat > "$1" <<CFG
sender_id = "app"
state_dir = "/var/lib/ferry-sender"
[source]
url = "sqlite:///srv/ferry-doc-app/app.sqlite3"
[partial]
change_column = "updated_at"
interval = "1s"
[push]
host = "127.0.0.1"
port = $FERRY_DOC_PORT
user = "ferry"
key_file = "/var/lib/ferry-sender/id_ed25519"
known_hosts = "/etc/ferry/known_hosts"
remote_dir = "/"
CFG
  ;;
  *) echo "editor: unexpected file $1" >&2; exit 1 ;;
esac
ED
chmod 0755 "$WORK/editor"
export EDITOR="$WORK/editor" SUDO_EDITOR="$WORK/editor" VISUAL="$WORK/editor"

# systemctl without systemd: the unit's ExecStart as its User=.
mkdir -p "$WORK/shim"
cat > "$WORK/shim/systemctl" <<'SH'
#!/usr/bin/env bash
set -euo pipefail
[ "$1" = enable ] && [ "$2" = --now ] || { echo "systemctl shim: only 'enable --now <unit>'" >&2; exit 1; }
unit=/etc/systemd/system/$3.service
user=$(sed -n 's/^User=//p' "$unit")
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
setpriv --reuid="$user" --regid="$user" --init-groups --reset-env \
  env RUST_LOG=info $exec_start >"$FERRY_DOC_WORK/$3.log" 2>&1 &
echo $! > "$FERRY_DOC_WORK/$3.pid"
sleep 1
kill -0 "$(cat "$FERRY_DOC_WORK/$3.pid")" || { cat "$FERRY_DOC_WORK/$3.log"; exit 1; }
SH
chmod 0755 "$WORK/shim/systemctl"
# sudo resets PATH to its secure_path, which starts at /usr/local/sbin.
if [ "$(ps -p 1 -o comm=)" != systemd ]; then
  [ -e /usr/local/sbin/systemctl ] && { echo "$0: /usr/local/sbin/systemctl exists; not replacing it" >&2; exit 1; }
  # sudo also resets the environment: the work directory goes in as text.
  sed -i "s|\$FERRY_DOC_WORK|$WORK|g" "$WORK/shim/systemctl"
  install -D -m 0755 "$WORK/shim/systemctl" /usr/local/sbin/systemctl
  SHIMMED=1
fi

# The app, once the users exist (before the sender's section).
make_app() {
  mkdir -p /srv/ferry-doc-app
  sqlite3 /srv/ferry-doc-app/app.sqlite3 "CREATE TABLE note (id INTEGER PRIMARY KEY, body TEXT, updated_at TEXT NOT NULL);
    INSERT INTO note VALUES (1, 'first', '2026-01-01 00:00:00');"
  chown -R ferry-sender: /srv/ferry-doc-app
}

# The doc's ```sh blocks, one file each.
awk -v dir="$WORK" '/^```sh$/ {n++; f=sprintf("%s/block%02d.sh", dir, n); inb=1; next}
  /^```$/ && inb {inb=0; next} inb {print > f}' docs/install.md
n=0
for block in "$WORK"/block*.sh; do
  n=$((n + 1))
  sed -i -e 's|^cargo build --release --locked --bins$|true  # built by the test suite|' \
    -e "s|target/release/|$BIN_DIR/|g" \
    -e "s|^RECEIVER=viz.example.org PORT=22$|RECEIVER=127.0.0.1 PORT=$PORT|" \
    -e "s|echo 'ssh-ed25519 AAAA… ferry-sender@app'|cat /var/lib/ferry-sender/id_ed25519.pub|" "$block"
  if grep -q "ferry-sender example-config" "$block"; then make_app; fi
  echo "=== docs/install.md block $n"; cat "$block"
  bash -euo pipefail "$block"
done

# What the doc promises: the row reaches the copy, later changes follow, and
# both agents call themselves healthy.
copy=/var/lib/ferry-receiver/copy.sqlite3
wait_for() {
  for _ in $(seq 1 200); do
    [ "$(sqlite3 "$copy" "$1" 2>/dev/null || true)" = "$2" ] && return 0
    sleep 0.1
  done
  echo "$0: the copy never answered '$2' to: $1" >&2; return 1
}
wait_for "SELECT body FROM note WHERE id = 1" first
# The app writes with a busy timeout, as apps do: the sender reads beside it.
sqlite3 -cmd ".timeout 10000" /srv/ferry-doc-app/app.sqlite3 "INSERT INTO note VALUES (2, 'second', '2026-01-02 00:00:00')"
wait_for "SELECT body FROM note WHERE id = 2" second
stat -c '%a %U:%G %n' /etc/ferry /etc/ferry/sender.toml /etc/ferry/receiver.toml /var/lib/ferry-sender/id_ed25519
sudo -u ferry-receiver ferry-receiver --config /etc/ferry/receiver.toml status
sudo -u ferry-sender ferry-sender --config /etc/ferry/sender.toml status
echo "install-doc: every step of docs/install.md worked as written"
