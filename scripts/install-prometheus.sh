#!/usr/bin/env bash
# Put Debian's `prometheus` and `promtool` binaries into .cache/prometheus/bin
# (for the alert-rule and live Prometheus tests), without installing the
# package or its dependencies: `apt-get download` + `dpkg -x`. Idempotent.
# Needs Debian's package registry (and root for `apt-get update` when the
# package lists are missing or do not know the package).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.cache/prometheus/bin

if [ ! -x "$bin/prometheus" ] || [ ! -x "$bin/promtool" ]; then
  for tool in apt-get dpkg; do
    command -v "$tool" >/dev/null || { echo "install-prometheus: $tool not found (Debian needed)" >&2; exit 1; }
  done
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # apt-get download writes as the unprivileged _apt user when it can.
  if [ "$(id -u)" = 0 ] && id -u _apt >/dev/null 2>&1; then chown _apt "$work"; fi
  # Update the package lists only when needed: apt knows no candidate, or the
  # one it knows has left the mirror (a newer point release replaced it).
  if ! apt-cache policy prometheus 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get update -qq
  fi
  if ! (cd "$work" && apt-get download -qq prometheus); then
    apt-get update -qq
    (cd "$work" && apt-get download -qq prometheus)
  fi
  deb=$(find "$work" -maxdepth 1 -name 'prometheus_*.deb' | head -n 1)
  [ -n "$deb" ] || { echo "install-prometheus: apt-get download prometheus fetched nothing" >&2; exit 1; }
  dpkg -x "$deb" "$work/root"
  mkdir -p "$bin"
  for tool in prometheus promtool; do
    install -m 0755 "$work/root/usr/bin/$tool" "$bin/$tool.tmp"
    mv -f "$bin/$tool.tmp" "$bin/$tool"  # atomic: a half-copied binary never looks installed
  done
fi

"$bin/prometheus" --version 2>&1 | head -n 1
"$bin/promtool" --version 2>&1 | head -n 1
