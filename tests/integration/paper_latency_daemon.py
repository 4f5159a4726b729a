"""`tickguard run` whose paper broker answers slowly: the kill window of issue 9 made wide.

    python paper_latency_daemon.py SECONDS run --config PATH

The daemon is the real one (the CLI, the composition root, the paper broker,
SQLite); only `PaperBroker.latency`, which has no config key, is set between
`app.build` and `app.serve` (the seam `app.serve` documents for tests). With a
latency of L seconds, an exit's journal says `sent` for L seconds before the
paper broker holds the order, and a lookup after a restart takes L seconds.
"""

from __future__ import annotations

import sys

from tickguard import app, cli
from tickguard.app import Daemon
from tickguard.brokers.paper import PaperBroker
from tickguard.config import Config


def main(argv: list[str]) -> int:
    latency = float(argv[0])
    build = app.build

    async def build_slow_paper(config: Config) -> Daemon:
        daemon = await build(config)
        if isinstance(daemon.broker, PaperBroker):
            daemon.broker.latency = latency
        return daemon

    app.build = build_slow_paper  # app.run builds through this module global
    return cli.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
