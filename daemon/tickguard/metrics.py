"""Every Prometheus series tickguard exports (docs/metrics.md), built in one place.

Tests pass a fresh `CollectorRegistry()`; the daemon uses its own registry
too (never the global one), with the process and platform collectors added.
Per-symbol ages are computed at scrape time by a collector the daemon
registers (`AgeCollector`), so symbols that stop being guarded vanish.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tickguard import __version__
from tickguard.status import Snapshot

# No `<name>_created` series: they doubled the exposition (one per counter and
# histogram child) and nothing reads them; restarts show in process_start_time.
# Process-wide, and it must come before any metric is made: so at import here.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in 0.26

SAFETY_NET_OPS = ("place", "move", "cancel", "lookup")  # tickguard_safety_net_failures_total{op}
NETWORK_ERROR_KINDS = (
    "dns",
    "connect",
    "tls",
    "handshake",
    "closed",
    "ping_timeout",
    "silence",
    "protocol",
)
EXIT_REASONS = ("stop_loss", "take_profit", "trailing_stop", "blind", "emergency")
PRICE_SOURCES = ("live", "poll", "cache", "manual", "none")
EXIT_FAILURE_REASONS = ("rejected", "timeout", "unavailable")
ORDER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.websocket_connected = Gauge(
            "tickguard_websocket_connected",
            "1 while the feed socket is open and subscribed",
            registry=r,
        )
        self.reconnect_attempts = Counter(
            "tickguard_websocket_reconnect_attempts", "Feed reconnect attempts", registry=r
        )
        self.network_errors = Counter(
            "tickguard_websocket_network_errors",
            "Feed connection failures seen, by kind",
            ["kind"],
            registry=r,
        )
        self.ticks = TickCounts()
        r.register(self.ticks)
        self.bad_messages = Counter(
            "tickguard_feed_bad_messages",
            "Feed frames or entries dropped, by reason",
            ["reason"],
            registry=r,
        )
        self.dns_lookups = Counter(
            "tickguard_dns_lookups",
            "DNS lookup stages tried, by resolver stage and outcome",
            ["resolver", "outcome"],
            registry=r,
        )
        self.dns_fallbacks = Counter(
            "tickguard_dns_fallbacks",
            "Resolutions that needed a fallback resolver or a last-known-good address",
            registry=r,
        )
        self.fallback_active = Gauge(
            "tickguard_fallback_active",
            "1 while prices come from the poll or the cache",
            registry=r,
        )
        self.exits = Counter(
            "tickguard_exits",
            "Exits sent, by reason and price source",
            ["reason", "price_source"],
            registry=r,
        )
        self.exit_failures = Counter(
            "tickguard_exit_failures",
            "Exits the broker refused or that timed out, by reason",
            ["reason"],
            registry=r,
        )
        self.order_seconds = Histogram(
            "tickguard_order_seconds",
            "Broker round-trip of exit orders",
            buckets=ORDER_BUCKETS,
            registry=r,
        )
        self.open_positions = Gauge(
            "tickguard_open_positions", "Positions being guarded", registry=r
        )
        # The account (docs/account.md): the broker's positions, reconciled against ours.
        self.unguarded_positions = Gauge(
            "tickguard_unguarded_positions",
            "Open broker positions that no one guards (no rule matches, or never registered)",
            registry=r,
        )
        self.external_closes = Counter(
            "tickguard_external_closes",
            "Positions closed outside tickguard (the broker showed them flat or opposite)",
            registry=r,
        )
        self.exit_quantity_clamped = Counter(
            "tickguard_exit_quantity_clamped",
            "Exits sized down to the broker's quantity",
            registry=r,
        )
        self.reconcile_failures = Counter(
            "tickguard_reconcile_failures",
            "Reconciliations that failed (positions endpoint error or timeout)",
            registry=r,
        )
        self.reconcile_last_success = Gauge(
            "tickguard_reconcile_last_success_timestamp_seconds",
            "Unix time of the last successful reconciliation (0 before the first)",
            registry=r,
        )
        self.market_open = Gauge(
            "tickguard_market_open", "1 while the configured market is open", registry=r
        )
        self.watchdog_pings = Counter("tickguard_watchdog_pings", "WATCHDOG=1 sent", registry=r)
        self.event_loop_lag = Gauge(
            "tickguard_event_loop_lag_seconds",
            "Last measured event-loop scheduling delay",
            registry=r,
        )
        # Every probe's delay, so a p99 can be read (histogram_quantile) and alerted on.
        self.event_loop_lag_observed = Histogram(
            "tickguard_event_loop_lag_observed_seconds",
            "Event-loop scheduling delay of each lag probe",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        # The freshness thresholds from the config (prices.*), so alert rules and
        # dashboards compare ages against the daemon's own settings.
        self.price_stale_threshold = Gauge(
            "tickguard_price_stale_threshold_seconds",
            "prices.stale_warning: older prices are stale",
            registry=r,
        )
        self.price_cache_timeout = Gauge(
            "tickguard_price_cache_timeout_seconds",
            "prices.cache_timeout: older prices are unusable",
            registry=r,
        )
        # Leadership among instances sharing a store (docs/ha.md).
        self.leader = Gauge(
            "tickguard_leader",
            "1 on the instance that leads (guards and sends); 0 on a standby or one that lost it",
            registry=r,
        )
        self.leader_changes = Counter(
            "tickguard_leader_changes", "Leadership changes this instance has seen", registry=r
        )
        # The broker-held safety net (docs/safety-net.md).
        self.safety_net_enabled = Gauge(
            "tickguard_safety_net_enabled", "1 when [safety_net] is enabled", registry=r
        )
        self.safety_net_positions = Gauge(
            "tickguard_safety_net_positions",
            "Guarded positions covered by an active broker-held stop",
            registry=r,
        )
        self.safety_net_failures = Counter(
            "tickguard_safety_net_failures",
            "Broker-held stop calls that failed, by operation",
            ["op"],
            registry=r,
        )
        self.build_info = Info("tickguard_build", "tickguard build information", registry=r)
        self.build_info.info({"version": __version__})
        # Pre-create the labelled series so dashboards see zeros, not gaps.
        for kind in NETWORK_ERROR_KINDS:
            self.network_errors.labels(kind)
        for op in SAFETY_NET_OPS:
            self.safety_net_failures.labels(op)
        for resolver in ("primary", "fallback", "last_known_good"):
            for outcome in ("ok", "fail"):
                self.dns_lookups.labels(resolver, outcome)
        # Exits and failures too: a counter first seen at 1 is invisible to
        # increase(), so alerts on a first exit would never fire.
        for reason in EXIT_REASONS:
            for price_source in PRICE_SOURCES:
                self.exits.labels(reason, price_source)
        for why in EXIT_FAILURE_REASONS:
            self.exit_failures.labels(why)


class TickCounts(Collector):
    """`tickguard_ticks_total{source}` and `tickguard_last_tick_timestamp_seconds`: plain
    numbers the price intakes (tickguard.feed.intake) keep, read at scrape time.

    Not a Counter and a Gauge: their inc() and set() take a lock each and cost about
    1 µs together per frame, as much as decoding a one-tick frame (docs/benchmarks.md).
    Written only on the guard loop; the scrape, on the API's thread, reads an int and
    a float, each read whole.
    """

    def __init__(self) -> None:
        self.received = {"live": 0, "poll": 0}  # ticks by source (both exported from the start)
        self.last_live_tick = 0.0  # unix time of the newest live tick; 0 before the first

    def collect(self) -> Iterable[Metric]:
        ticks = CounterMetricFamily(
            "tickguard_ticks", "Prices received, by source", labels=["source"]
        )
        for source, count in list(self.received.items()):
            ticks.add_metric([source], count)
        yield ticks
        yield GaugeMetricFamily(
            "tickguard_last_tick_timestamp_seconds",
            "Unix time of the newest live tick",
            value=self.last_live_tick,
        )


class AgeCollector(Collector):
    """Price ages of guarded symbols, computed at scrape time from the newest snapshot.

    `snapshot` gives it (the API refreshes it before each scrape), `now` the
    clock its times are on.
    """

    def __init__(self, snapshot: Callable[[], Snapshot], now: Callable[[], float]) -> None:
        self._snapshot = snapshot
        self._now = now

    def collect(self) -> Iterable[GaugeMetricFamily]:
        snapshot, now = self._snapshot(), self._now()
        quotes = snapshot.guarded_quotes(now)
        per_symbol = GaugeMetricFamily(
            "tickguard_price_age_seconds",
            "Age of the newest usable price of each guarded symbol",
            labels=["symbol"],
        )
        for q in quotes:
            per_symbol.add_metric([q.symbol], q.age)
        yield per_symbol
        yield GaugeMetricFamily(
            "tickguard_price_age_max_seconds",
            "Max price age over guarded symbols (0 with no positions)",
            value=max((q.age for q in quotes), default=0.0),
        )
        yield GaugeMetricFamily(
            "tickguard_stale_symbols",
            "Guarded symbols whose price is stale or unusable",
            value=len(snapshot.stale_symbols(now)),
        )
