#!/usr/bin/env bash
# Make PostgreSQL's server binaries (initdb, pg_ctl, postgres) available for the
# store and failover tests, which run their own throw-away cluster on a free
# loopback port (tests/integration/pg.py). Idempotent: nothing to do when
# /usr/lib/postgresql/*/bin/initdb exists.
# Otherwise installs Debian's `postgresql` package, which needs root and
# Debian's package registry.
#
# No cluster and no server of Debian's own: the package's postinst creates a
# "main" cluster on port 5432 and starts it (through invoke-rc.d or systemd).
# While the package installs, a drop-in sets postgresql-common's
# `create_main_cluster = false`, so no cluster is created and the postinst's
# start finds nothing to start; the drop-in is removed afterwards, so later
# installs behave as Debian intends. (A policy-rc.d would block every service
# that any concurrent install starts; this touches PostgreSQL alone.)
set -euo pipefail
cd "$(dirname "$0")/.."

find_initdb() {
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || :)
  [ -n "$found" ] && [ -x "$found" ] && echo "$found"
}

if ! initdb=$(find_initdb); then
  for tool in apt-get apt-cache; do
    command -v "$tool" >/dev/null || { echo "install-postgresql: $tool not found (Debian needed)" >&2; exit 1; }
  done
  [ "$(id -u)" = 0 ] || { echo "install-postgresql: run as root to install Debian's postgresql package" >&2; exit 1; }

  dropin_dir=/etc/postgresql-common/createcluster.d
  dropin=$dropin_dir/zz-tickguard-install.conf
  created=()  # the directories made for the drop-in, innermost first (removed if left empty)
  [ -d "$dropin_dir" ] || created+=("$dropin_dir")
  [ -d "${dropin_dir%/*}" ] || created+=("${dropin_dir%/*}")
  cleanup() {
    rm -f "$dropin"
    for dir in "${created[@]}"; do rmdir "$dir" 2>/dev/null || :; done
  }
  trap cleanup EXIT
  mkdir -p "$dropin_dir"
  printf '%s\n' "# Written by tickguard's scripts/install-postgresql.sh while it installs; removed after." \
    "create_main_cluster = false" > "$dropin"

  apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  }
  # Update the package lists only when needed: apt knows no candidate, or the
  # one it knows has left the mirror (a newer point release replaced it).
  if ! apt-cache policy postgresql 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get update -qq
  fi
  if ! apt_install; then
    apt-get update -qq
    apt_install
  fi
  initdb=$(find_initdb) || { echo "install-postgresql: postgresql installed, but no /usr/lib/postgresql/*/bin/initdb" >&2; exit 1; }
fi

"$initdb" --version
