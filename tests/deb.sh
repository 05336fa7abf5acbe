#!/usr/bin/env bash
# The .deb packages on this machine: built by systemd/deb/build.sh (cargo-deb;
# PROFILE=dev packages the test suite's debug build), installed with dpkg -i,
# checked (binaries, --version, systemd-analyze verify on the installed units,
# users and directories, the conffile's owner and mode, man pages,
# completions), then purged: nothing of them may remain but the system users,
# which Debian's policy leaves and this test then removes. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "$0: run as root (dpkg -i)" >&2; exit 1; }
if dpkg -s ferry-sender >/dev/null 2>&1 || dpkg -s ferry-receiver >/dev/null 2>&1 \
  || [ -e /etc/ferry ] || [ -e /usr/bin/ferry-sender ] || id ferry-sender >/dev/null 2>&1; then
  echo "$0: ferry is already installed here; this test installs and purges it, so run it on a scratch machine" >&2
  exit 1
fi
PROFILE=${PROFILE:-dev} NO_BUILD=${NO_BUILD:-1} bash systemd/deb/build.sh
debs=(target/debian/ferry-sender_*.deb target/debian/ferry-receiver_*.deb)
cleanup() {
  dpkg --purge ferry-sender ferry-receiver >/dev/null 2>&1 || true
  for u in ferry-sender ferry-receiver; do
    userdel "$u" 2>/dev/null || true
    groupdel "$u" 2>/dev/null || true
  done
}
trap cleanup EXIT
fail() { echo "deb: $*" >&2; exit 1; }

dpkg -i "${debs[@]}"
for a in sender receiver; do
  [ "$(dpkg-query -W -f='${Status}' "ferry-$a")" = "install ok installed" ] || fail "ferry-$a not installed"
  "/usr/bin/ferry-$a" --version | grep -q "^ferry-$a " || fail "ferry-$a --version"
  msg=$(systemd-analyze verify "/usr/lib/systemd/system/ferry-$a.service" 2>&1) || fail "verify: $msg"
  [ -z "$msg" ] || fail "systemd-analyze verify ferry-$a.service said: $msg"
  id "ferry-$a" >/dev/null || fail "user ferry-$a missing"
  [ "$(stat -c '%a %U' "/var/lib/ferry-$a")" = "700 ferry-$a" ] || fail "/var/lib/ferry-$a: $(stat -c '%a %U' "/var/lib/ferry-$a")"
  [ "$(stat -c '%a %U:%G' "/etc/ferry/$a.toml")" = "640 root:ferry-$a" ] || fail "/etc/ferry/$a.toml: $(stat -c '%a %U:%G' "/etc/ferry/$a.toml")"
  dpkg-query -W -f='${Conffiles}\n' "ferry-$a" | grep -q "/etc/ferry/$a.toml" || fail "$a.toml is not a conffile"
  runuser -u "ferry-$a" -- cat "/etc/ferry/$a.toml" >/dev/null || fail "ferry-$a cannot read its configuration"
  zcat "/usr/share/man/man1/ferry-$a.1.gz" | grep -q "ferry-$a" || fail "man page"
  zcat "/usr/share/man/man1/ferry-$a-status.1.gz" | grep -q "monitoring" || fail "status man page"
  grep -q "ferry-$a" "/usr/share/bash-completion/completions/ferry-$a" || fail "bash completion"
  [ -s "/usr/share/zsh/vendor-completions/_ferry-$a" ] || fail "zsh completion"
  [ -s "/usr/share/fish/vendor_completions.d/ferry-$a.fish" ] || fail "fish completion"
done
[ "$(stat -c '%a %U' /srv/ferry/inbox)" = "2770 ferry-receiver" ] || fail "inbox: $(stat -c '%a %U' /srv/ferry/inbox)"
# The packaged agents run: the receiver's check as its user, against the
# shipped example (its database is not there: the check must say so, by name).
out=$(runuser -u ferry-receiver -- ferry-receiver --config /etc/ferry/receiver.toml check 2>&1 || true)
echo "$out" | grep -q "state_dir /var/lib/ferry-receiver is writable" || fail "receiver check: $out"

dpkg --purge ferry-sender ferry-receiver
for p in /usr/bin/ferry-sender /usr/bin/ferry-receiver /etc/ferry /var/lib/ferry-sender \
  /var/lib/ferry-receiver /srv/ferry /usr/lib/systemd/system/ferry-sender.service \
  /usr/share/man/man1/ferry-sender.1.gz /usr/share/bash-completion/completions/ferry-receiver; do
  [ ! -e "$p" ] || fail "$p is left after purge"
done
dpkg -s ferry-sender >/dev/null 2>&1 && fail "ferry-sender still known to dpkg"
echo "deb: both packages install, verify, run and purge cleanly"
