#!/usr/bin/env bash
# The whole test suite: lint, strict typing of the daemon, then pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev
echo "== ruff"; .venv/bin/ruff check daemon tests benchmarks
echo "== mypy --strict"; .venv/bin/mypy --strict daemon/tickguard
echo "== prometheus (promtool and server for the alert and dashboard tests)"; scripts/install-prometheus.sh
if command -v dpkg-deb >/dev/null; then echo "== deb (for the tests under a real systemd)"; packaging/build-deb.sh; fi
echo "== pytest"; .venv/bin/pytest "$@"
