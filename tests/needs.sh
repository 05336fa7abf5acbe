#!/usr/bin/env bash
# Sourced by tests/run and the benchmarks: installs what they need (PostgreSQL
# server binaries, OpenSSH server and client, zstd, systemd-analyze, bc, the
# sqlite3 shell, sudo for the install doc, Prometheus and promtool) when
# missing, or says exactly what to install. Run as root, or with them installed.
ferry_needs() {
  local need=()
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  command -v ssh >/dev/null && command -v sftp >/dev/null || need+=(openssh-client)
  command -v zstd >/dev/null || need+=(zstd)
  command -v systemd-analyze >/dev/null || need+=(systemd)
  command -v bc >/dev/null || need+=(bc)
  command -v sqlite3 >/dev/null || need+=(sqlite3)
  command -v sudo >/dev/null || need+=(sudo)
  command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "$0: installing ${need[*]}"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      # Install without starting services (prometheus would listen on :9090):
      # the tests start their own, on loopback.
      local policy=""
      if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d
        policy=1
      fi
      apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
      [ -n "$policy" ] && rm -f /usr/sbin/policy-rc.d
    else
      echo "$0: missing ${need[*]}; install them (sudo apt-get install -y ${need[*]}) or run as root" >&2
      exit 1
    fi
  fi
  # A real S3 server (SigV4) for the object-storage tests, from crates.io.
  if [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" ]; then
    echo "$0: installing s3s-fs (cargo install s3s-fs@0.14.1 --features binary --locked)"
    cargo install s3s-fs@0.14.1 --features binary --locked --quiet
  fi
  # pyarrow and DuckDB read the Parquet exports back, from the package
  # registry into a venv of their own.
  local venv="${FERRY_PY:-$HOME/.cache/ferry-tests/venv}"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import pyarrow, duckdb' 2>/dev/null; then
    echo "$0: installing pyarrow and duckdb into $venv (pip)"
    python3 -m venv "$venv" || { echo "$0: python3 -m venv failed; apt-get install -y python3-venv" >&2; exit 1; }
    "$venv/bin/pip" install -q pyarrow duckdb
  fi
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    echo "$0: as root the PostgreSQL clusters run as the 'postgres' user, which is missing; reinstall the postgresql package" >&2
    exit 1
  fi
}
ferry_needs
