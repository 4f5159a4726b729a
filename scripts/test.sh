#!/usr/bin/env bash
# The whole test suite: lint, strict typing of the daemon, then pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev
echo "== ruff"; .venv/bin/ruff check daemon tests benchmarks
echo "== mypy --strict"; .venv/bin/mypy --strict daemon/tickguard
# Off CI these may fail (no root for apt, no dpkg-deb): their tests then skip
# and say why. With TICKGUARD_SYSTEM_TESTS=require (.ci/run) a failure is fatal.
optional() {
  "$@" && return 0
  [ "${TICKGUARD_SYSTEM_TESTS:-}" = require ] && exit 1
  echo "(failed: $*; the tests that need it will skip)"
}
echo "== prometheus (promtool and server for the alert and dashboard tests)"
optional scripts/install-prometheus.sh
echo "== postgresql (a throw-away cluster for the store and failover tests)"
optional scripts/install-postgresql.sh
echo "== deb (for the tests under a real systemd)"
optional packaging/build-deb.sh
echo "== pytest"; .venv/bin/pytest "$@"
