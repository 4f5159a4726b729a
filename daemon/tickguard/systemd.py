"""systemd notification (docs/cli.md, systemd) and the event-loop lag probe.

READY=1 once the API listens and the guard loop runs; STATUS= on state
changes; WATCHDOG=1 every WATCHDOG_USEC/2, but only when the guard loop made
progress since the last ping, sent from the event loop itself (a thread
would hide a stuck loop); STOPPING=1 on shutdown. Without NOTIFY_SOCKET
every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping

import sdnotify

from tickguard.metrics import Metrics

log = logging.getLogger(__name__)

# How often the lag probe wakes: often enough that a 50 ms stall is seen and a p99
# over a one-second burst has 100 samples, cheap enough not to matter (100 wakeups/s,
# about 0.2% of a core).
LAG_PROBE_INTERVAL = 0.01


class Notifier:
    """sd_notify through sdnotify, with its errors surfaced (debug=True) and logged."""

    def __init__(self) -> None:
        self._sd: sdnotify.SystemdNotifier | None = None
        if os.environ.get("NOTIFY_SOCKET"):
            try:
                self._sd = sdnotify.SystemdNotifier(debug=True)
            except OSError as exc:
                log.warning("systemd notify socket unusable: %s", exc)
        self.watchdog_interval = _watchdog_interval(os.environ)
        self._status = ""

    @property
    def enabled(self) -> bool:
        return self._sd is not None

    def send(self, message: str) -> bool:
        if self._sd is None:
            return False
        try:
            self._sd.notify(message)
        except OSError as exc:
            log.warning("systemd notify failed: %s", exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self._status = status
        self.send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1\nSTATUS=stopping")

    async def watchdog(self, progress: Callable[[], int], metrics: Metrics) -> None:
        """Ping every WATCHDOG_USEC/2 while `progress()` keeps changing."""
        if self.watchdog_interval is None or not self.enabled:
            return
        last = progress()
        while True:
            await asyncio.sleep(self.watchdog_interval)
            now = progress()
            if now != last:
                last = now
                if self.send("WATCHDOG=1"):
                    metrics.watchdog_pings.inc()
            else:
                log.error("watchdog: the guard loop made no progress; not pinging systemd")

    def close(self) -> None:
        if self._sd is not None and self._sd.socket is not None:
            self._sd.socket.close()
        self._sd = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000


async def measure_lag(metrics: Metrics, interval: float = LAG_PROBE_INTERVAL) -> None:
    """Export how late the event loop wakes a sleeper: a blocked loop shows here."""
    while True:
        started = time.monotonic()
        await asyncio.sleep(interval)
        lag = max(0.0, time.monotonic() - started - interval)
        metrics.event_loop_lag.set(lag)
        metrics.event_loop_lag_observed.observe(lag)
