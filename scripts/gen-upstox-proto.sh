#!/usr/bin/env bash
# Regenerate the Upstox feed's protobuf modules from the .proto files beside them:
#
#   daemon/tickguard/feed/MarketDataFeedV3.proto -> MarketDataFeedV3_pb2.py, .pyi
#   daemon/tickguard/feed/upstox_wire.proto      -> upstox_wire_pb2.py, .pyi
#
# The output is committed; run this only after changing a .proto, then
# `git diff` the result. protoc comes from grpcio-tools in a throwaway venv, never
# the project's (grpcio-tools pins its own protobuf, which would replace the
# runtime the daemon is locked to). The release is pinned: grpcio-tools 1.72.1
# ships protoc 30.0, whose code asks for a runtime of 6.30.0 or newer (pyproject's
# floor), and every runtime since (7.x included) accepts it.
#
# Usage: scripts/gen-upstox-proto.sh        (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

GRPCIO_TOOLS="1.72.1"
EXPECTED_PROTOC="libprotoc 30.0"
PYTHON="${PYTHON:-python3}"
FEED=daemon/tickguard/feed
PROTOS=("$FEED/MarketDataFeedV3.proto" "$FEED/upstox_wire.proto")

venv="$(mktemp -d)"
trap 'rm -rf "$venv"' EXIT
"$PYTHON" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "grpcio-tools==$GRPCIO_TOOLS"
protoc=("$venv/bin/python" -m grpc_tools.protoc)
version="$("${protoc[@]}" --version)"
if [ "$version" != "$EXPECTED_PROTOC" ]; then
  echo "grpcio-tools $GRPCIO_TOOLS brought $version, not $EXPECTED_PROTOC" >&2
  exit 1
fi

# -I daemon: the files register as tickguard/feed/*.proto, and upstox_wire_pb2
# imports `from tickguard.feed import MarketDataFeedV3_pb2`.
"${protoc[@]}" -I daemon --python_out=daemon --pyi_out=daemon "${PROTOS[@]}"

# Generated code is not held to the project's lint rules (ruff reads *.py and
# *.pyi); mypy is told about it in pyproject.toml's [tool.mypy] overrides.
for proto in "${PROTOS[@]}"; do
  for out in "${proto%.proto}_pb2.py" "${proto%.proto}_pb2.pyi"; do
    { echo "# ruff: noqa"; cat "$out"; } > "$out.tmp"
    mv "$out.tmp" "$out"
  done
done
echo "generated with $version (grpcio-tools $GRPCIO_TOOLS):"
ls -1 "$FEED"/*_pb2.py "$FEED"/*_pb2.pyi
