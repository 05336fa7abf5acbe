#!/usr/bin/env bash
# Builds target/debian/ferry-sender_*.deb and ferry-receiver_*.deb with
# cargo-deb (installed with `cargo install cargo-deb --locked` when missing):
# the binary, its hardened unit, sysusers and tmpfiles snippets, the example
# configuration as a conffile, man pages and shell completions generated from
# the binaries themselves. PROFILE=dev packages the debug build (the test
# suite does, to skip a release build); NO_BUILD=1 packages what is built.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v cargo-deb >/dev/null; then
  echo "$0: installing cargo-deb (cargo install cargo-deb --locked)"
  cargo install cargo-deb --locked --quiet
fi
profile=${PROFILE:-release}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
[ -n "${NO_BUILD:-}" ] || cargo build --locked --profile "$profile" --bins
for agent in sender receiver; do
  rm -rf "target/ferry-docs/$agent"
  "target/$dir/ferry-$agent" generate-docs "target/ferry-docs/$agent" >/dev/null
  gzip -9n target/ferry-docs/$agent/man/*.1
  cargo deb --no-build --profile "$profile" -p "ferry-$agent" --quiet
done
ls target/debian/*.deb
