#!/usr/bin/env bash
# Build the Debian 12 package: dist/tickguard_<version>_<arch>.deb
#
#   packaging/build-deb.sh
#
# Run it on Debian 12 (so the venv's ABI and interpreter path match the
# target). No root needed, except to apt-get install python3-venv when
# /usr/bin/python3 lacks it. What goes in:
#   /opt/tickguard/           a venv on Debian's /usr/bin/python3.X, with the
#                             pinned requirements.lock and the tickguard wheel
#                             (no pip/setuptools at run time); built in a
#                             staging dir, then relocated to /opt/tickguard
#   /usr/bin/tickguard        -> /opt/tickguard/bin/tickguard
#   /lib/systemd/system/tickguard.service
#   /etc/tickguard/config.toml (conffile: kept on upgrade; ships without a
#                             feed.url, so the unit refuses to start until set)
#   /usr/share/tickguard/grafana/, /usr/share/doc/tickguard/
# Takes ~20 s (pip caches downloads and built wheels in ~/.cache/pip).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=/opt/tickguard
export PYTHONDONTWRITEBYTECODE=1   # byte-code is compiled once, under its final path
PY=/usr/bin/python3   # Debian's, not a pyenv/PATH one: the package runs on it

die() { echo "build-deb: $*" >&2; exit 1; }
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (this builds on Debian)"
[ -x "$PY" ] || die "$PY not found (apt-get install python3)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PY is $("$PY" -V 2>&1); tickguard needs Python >= 3.11 (Debian 12)"
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PYX=/usr/bin/python$PYVER   # the venv links to the versioned binary, which the package depends on
if ! "$PYX" -c 'import ensurepip, venv' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "build-deb: installing python3-venv"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    die "$PYX lacks venv/ensurepip: sudo apt-get install python3-venv"
  fi
fi

VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
ARCH=$(dpkg --print-architecture)
OUT=dist/tickguard_${VERSION}_${ARCH}.deb

STAGE=$(mktemp -d /tmp/tickguard-deb.XXXXXX)
trap 'rm -rf "$STAGE"' EXIT
PKG=$STAGE/root
VENV=$PKG$PREFIX
pip() { "$VENV/bin/python" -m pip -q --disable-pip-version-check --no-input "$@"; }

echo "build-deb: venv on $PYX (Python $PYVER), pinned from requirements.lock"
"$PYX" -m venv "$VENV"
# The build backend first, at its pinned version: every build below uses it.
grep -E '^(setuptools|wheel)==' requirements.lock > "$STAGE/backend.txt"
pip install --no-deps --no-compile -r "$STAGE/backend.txt"
pip install --no-deps --no-compile --no-build-isolation -r requirements.lock
# The project wheel, built from a copy: setuptools writes build/ and *.egg-info.
mkdir "$STAGE/src"
cp -r pyproject.toml README.md daemon "$STAGE/src/"
find "$STAGE/src" -name __pycache__ -prune -exec rm -rf {} +
pip wheel --no-deps --no-build-isolation -w "$STAGE/wheel" "$STAGE/src" >/dev/null
pip install --no-deps --no-compile "$STAGE"/wheel/tickguard-*.whl
# Build tools are not needed at run time, and pip would only invite changes
# to a tree dpkg owns.
pip uninstall -y setuptools wheel
"$VENV/bin/python" -m pip uninstall -q -y pip
"$VENV/bin/tickguard" --version >/dev/null || die "the staged venv does not run"

echo "build-deb: relocating the venv to $PREFIX"
for f in "$VENV"/bin/*; do
  [ -f "$f" ] && [ ! -L "$f" ] || continue
  if head -c 2 "$f" | grep -q '^#!'; then sed -i "1s|$VENV|$PREFIX|" "$f"; fi
done
sed -i "s|$VENV|$PREFIX|g" "$VENV"/bin/activate* "$VENV/pyvenv.cfg"
# direct_url.json (PEP 610) names the staged wheel file: drop it and its RECORD line.
for d in "$VENV"/lib/python*/site-packages/tickguard-*.dist-info; do
  rm -f "$d/direct_url.json"; sed -i '/direct_url\.json/d' "$d/RECORD"
done
# Byte-code compiled now, under its final path: the service cannot write there.
"$PYX" -m compileall -q -j 0 -s "$PKG" -p / "$VENV/lib" >/dev/null
if grep -rlF "$STAGE" "$PKG" >/dev/null; then
  grep -rlF "$STAGE" "$PKG" | head >&2
  die "staging path left in the package (above)"
fi

echo "build-deb: /etc/tickguard/config.toml from packaging/config.example.toml"
# The example, every key documented, with feed.url emptied: until the admin
# sets it, check-config and `run` reject the file (exit 2), so the unit
# cannot start unconfigured.
URL_LINE='url = "wss://feed.example.com/ws"'
[ "$(grep -cxF "$URL_LINE" packaging/config.example.toml)" = 1 ] \
  || die "packaging/config.example.toml: expected exactly one line: $URL_LINE"
{ cat packaging/debian/config-header.toml
  sed "s|^$URL_LINE\$|url = \"\"                         # REQUIRED: your feed, ws:// or wss://|" \
    packaging/config.example.toml
} > "$STAGE/config.toml"
problems=$("$VENV/bin/python" -m tickguard check-config "$STAGE/config.toml" || true)
[ "$(printf '%s\n' "$problems" | grep -c .)" = 1 ] && printf '%s' "$problems" | grep -q '^feed\.url: ' \
  || die "the shipped config should fail on feed.url alone, got: $problems"

echo "build-deb: package tree"
install -d "$PKG/usr/bin" "$PKG/lib/systemd/system" "$PKG/etc/tickguard" \
  "$PKG/usr/share/doc/tickguard" "$PKG/usr/share/tickguard" "$PKG/DEBIAN"
ln -s "$PREFIX/bin/tickguard" "$PKG/usr/bin/tickguard"
install -m 0644 systemd/tickguard.service "$PKG/lib/systemd/system/"
install -m 0644 "$STAGE/config.toml" "$PKG/etc/tickguard/config.toml"
install -m 0644 packaging/config.example.toml README.md "$PKG/usr/share/doc/tickguard/"
install -m 0644 packaging/debian/copyright "$PKG/usr/share/doc/tickguard/"
# Dashboards, provisioning and alert rules (their promtool tests stay behind).
if [ -d grafana ] && [ -n "$(ls -A grafana)" ]; then
  cp -r grafana "$PKG/usr/share/tickguard/grafana"
  find "$PKG/usr/share/tickguard/grafana" -name tests -type d -prune -exec rm -rf {} +
fi
for s in postinst prerm postrm; do install -m 0755 "packaging/debian/$s" "$PKG/DEBIAN/$s"; done
echo /etc/tickguard/config.toml > "$PKG/DEBIAN/conffiles"
SIZE=$(du -sk --exclude=DEBIAN "$PKG" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$SIZE/" \
  -e "s/@PYVER@/$PYVER/" packaging/debian/control.in > "$PKG/DEBIAN/control"
# Files owned by root, not readable-only-by-us whatever the umask was.
chmod -R u+rwX,go+rX,go-w "$PKG"

mkdir -p dist
# gzip: xz would take 10 s more for 2 MB less.
dpkg-deb --root-owner-group -Zgzip --build "$PKG" "$STAGE/out.deb" >/dev/null
mv "$STAGE/out.deb" "$OUT"
echo "build-deb: $OUT ($(du -h "$OUT" | cut -f1))"
