"""The composition root: the one place that builds the world and runs it.

config -> store -> broker -> price book -> guard -> executor -> guard loop ->
feed supervisor and fallback poll -> the API's port -> HTTP API (its own
thread) -> systemd notifier.

Shutdown (SIGTERM/SIGINT): stop the API, let exits in flight finish (bounded),
persist trailing anchors, close the store, STOPPING=1, exit 0 — well within
systemd's TimeoutStopSec. A background task that crashes is logged, counted
and restarted; one that keeps crashing ends the daemon with exit 1 so systemd
restarts it: positions are never left unguarded silently.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, PlatformCollector, ProcessCollector

from tickguard import __version__
from tickguard.api import build_app
from tickguard.brokers.base import Broker
from tickguard.brokers.paper import PaperBroker
from tickguard.brokers.upstox import UpstoxBroker
from tickguard.config import Config, read_secret
from tickguard.control import GuardPort
from tickguard.core.backoff import Exponential
from tickguard.core.guard import Guard
from tickguard.core.market import MarketCalendar
from tickguard.core.prices import PriceBook
from tickguard.errors import StoreError
from tickguard.executor import DEFAULT_ORDER_TIMEOUT, ExitExecutor
from tickguard.feed.dns import AiohttpResolver, ResolverChain
from tickguard.feed.json_protocol import JsonProtocol
from tickguard.feed.json_protocol import poll_source as json_poll_source
from tickguard.feed.poller import FallbackPoller
from tickguard.feed.protocol import FeedProtocol, PollSource
from tickguard.feed.supervisor import OPEN_TIMEOUT, FeedSupervisor
from tickguard.feed.upstox import UpstoxProtocol, authorize
from tickguard.feed.upstox import poll_source as upstox_poll_source
from tickguard.guard_loop import GuardLoop
from tickguard.http_server import ApiServer
from tickguard.leader import Leadership
from tickguard.metrics import AgeCollector, Metrics
from tickguard.reconciler import FETCH_TIMEOUT, Reconciler
from tickguard.safety_net import SafetyNet
from tickguard.status import Snapshot
from tickguard.store import AsyncStore, Store
from tickguard.store_pg import PostgresStore
from tickguard.systemd import Notifier, measure_lag

log = logging.getLogger(__name__)

SHUTDOWN_EXIT_WAIT = 5.0  # seconds exits in flight get to finish at shutdown
API_SHUTDOWN_TIMEOUT = 2.0
CRASHES_TOLERATED = 5  # per task per CRASH_WINDOW before the daemon gives up (exit 1)
CRASH_WINDOW = 60.0
CRASH_PAUSE = 0.1  # first pause before restarting a crashed task; doubles...
CRASH_PAUSE_MAX = 5.0  # ...up to this


@dataclass
class Daemon:
    """The parts, for `serve` and for tests. Built only by `build`; the API sees only `port`."""

    config: Config
    store: Store | None  # the SQLite store (None: the state is in a shared PostgreSQL store)
    state: AsyncStore  # the store of either kind, awaited by the daemon's parts
    metrics: Metrics
    book: PriceBook
    guard: Guard
    broker: Broker
    executor: ExitExecutor
    guard_loop: GuardLoop
    market: MarketCalendar
    resolver: ResolverChain
    supervisor: FeedSupervisor
    poller: FallbackPoller | None
    reconciler: Reconciler
    safety_net: SafetyNet | None
    leadership: Leadership | None  # None: a lone instance, which always guards
    session: aiohttp.ClientSession
    notifier: Notifier
    port: GuardPort
    snapshot: Callable[[], Snapshot]
    monotonic: Callable[[], float] = time.monotonic
    task_crashes: Counter | None = None
    rearm: bool = False  # arm config positions even into a lost store (`run --rearm`)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def build(config: Config) -> Daemon:
    """Build every part from the config (nothing runs yet). StoreError when the store
    cannot be opened (a shared one: unreachable, or newer than this tickguard)."""
    store: Store | None = None
    shared: PostgresStore | None = None
    if config.store.shared:  # docs/ha.md
        shared = await PostgresStore.open(config.store.url)
        shared.fence()  # a write commits only while this instance leads (docs/ha.md)
        state: AsyncStore = shared
    else:
        store = Store.in_dir(config.daemon.state_dir)
        state = store.aio
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    metrics = Metrics(registry)
    metrics.price_stale_threshold.set(config.prices.stale_warning)
    metrics.price_cache_timeout.set(config.prices.cache_timeout)
    book = PriceBook(config.prices.stale_warning, config.prices.cache_timeout)
    guard = Guard(
        book,
        blind_policy=config.guard.blind_policy,
        blind_after=config.guard.blind_after,
        install_id=state.install_id,
    )

    def last_price(symbol: str) -> float | None:
        price = book.get(symbol)
        return price.value if price is not None else None

    resolver = ResolverChain(config.dns, state, metrics)
    # One HTTP client for the poll and the brokers, resolving through the DNS chain.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=AiohttpResolver(resolver)),
        headers={"User-Agent": f"tickguard/{__version__}"},
        trust_env=False,
    )
    up = config.upstox
    uses_upstox = "upstox" in (config.feed.protocol, config.broker.kind)
    upstox_token = read_secret(up.token_file, "upstox.token_file") if uses_upstox else None
    broker: PaperBroker | UpstoxBroker  # both hold stops for the safety net too
    if config.broker.kind == "upstox":
        assert upstox_token is not None  # the config requires a token file
        broker = UpstoxBroker(
            session,
            token=upstox_token,
            api_url=up.api_url,
            hft_url=up.hft_url,
            product=up.product,
            products=config.account.products,
        )
    else:
        assert store is not None  # the config refuses the paper broker with a shared store
        broker = PaperBroker(store, last_price)
    executor = ExitExecutor(guard, state, broker)
    m = config.market
    market = MarketCalendar(m.zone(), m.sessions, m.weekdays, m.holidays, m.always_open)
    guard_loop = GuardLoop(
        guard, state, executor, metrics, market, sweep_interval=config.guard.sweep_interval
    )
    executor.listener = guard_loop.on_exit
    executor.on_first_send = guard_loop.on_sent
    if isinstance(broker, PaperBroker):  # its account: a registered position's entry filled
        guard_loop.on_registered = broker.open_if_flat
    reconciler = Reconciler(broker, guard_loop, metrics, config.account, config.rules)
    executor.sizer = (
        reconciler.exit_quantity
    )  # docs/account.md: no exit larger than the account holds
    safety_net = None
    if config.safety_net.enabled:  # docs/safety-net.md
        safety_net = SafetyNet(broker, guard, state, metrics, config.safety_net.margin_pct)
        safety_net.on_fired = reconciler.trigger
        executor.disarm = safety_net.disarm
    metrics.safety_net_enabled.set(1 if safety_net is not None else 0)
    leadership = Leadership(shared, metrics) if shared is not None else None
    guard_loop.guarding = leadership is None  # a standby guards nothing until it takes over
    metrics.leader.set(1 if leadership is None else 0)

    def subscriptions() -> set[str]:
        """What the feed subscribes: config symbols plus guarded ones."""
        return set(config.feed.symbols) | set(guard.symbols())

    protocol: FeedProtocol
    endpoint: Callable[[], Awaitable[str]] | None = None
    poll: PollSource | None = None
    if config.feed.protocol == "upstox":
        assert upstox_token is not None
        token = upstox_token
        protocol = UpstoxProtocol()

        async def authorized_url() -> str:  # single-use: a fresh one per connection
            return await authorize(session, up.api_url, token, timeout=OPEN_TIMEOUT)

        endpoint = authorized_url
        poll = upstox_poll_source(up.api_url, token)
    else:
        protocol = JsonProtocol()
        if config.feed.fallback_url:
            poll = json_poll_source(config.feed.fallback_url)
    supervisor = FeedSupervisor(
        config.feed,
        protocol=protocol,
        resolver=resolver,
        book=book,
        metrics=metrics,
        symbols=subscriptions,
        on_prices=guard_loop.on_prices,
        market_open=lambda: guard_loop.market_open,
        rng=random.Random(),
        endpoint=endpoint,
        on_connected=reconciler.trigger,
    )
    reconciler.subscribe = supervisor.subscribe_more
    poller = None
    if poll is not None:
        poller = FallbackPoller(
            poll,
            config.feed.poll_interval,
            session=session,
            supervisor=supervisor,
            book=book,
            metrics=metrics,
            symbols=subscriptions,
            on_prices=guard_loop.on_prices,
        )

    def snapshot() -> Snapshot:
        return guard_loop.snapshot(
            feed=supervisor.status(),
            dns=resolver.status(),
            poll=poller.status() if poller is not None else None,
            account=reconciler.status(),
            safety_net=safety_net.status() if safety_net is not None else None,
            ha=leadership.status() if leadership is not None else None,
        )

    port = GuardPort(
        take_snapshot=snapshot,
        guard_loop=guard_loop,
        guard=guard,
        executor=executor,
        store=state,
        broker=broker,
        subscribe=supervisor.subscribe_more,
        account_changed=reconciler.trigger,
        token=read_secret(config.http.token_file, "http.token_file"),
        close_wait=DEFAULT_ORDER_TIMEOUT + 2.0,
    )
    registry.register(AgeCollector(port.latest, port.now))
    return Daemon(
        config=config,
        store=store,
        state=state,
        metrics=metrics,
        book=book,
        guard=guard,
        broker=broker,
        executor=executor,
        guard_loop=guard_loop,
        market=market,
        resolver=resolver,
        supervisor=supervisor,
        poller=poller,
        reconciler=reconciler,
        safety_net=safety_net,
        leadership=leadership,
        session=session,
        notifier=Notifier(),
        port=port,
        snapshot=snapshot,
        task_crashes=Counter(
            "tickguard_task_crashes",
            "Background tasks that crashed and were restarted",
            ["task"],
            registry=registry,
        ),
    )


async def run(config: Config, *, stop: asyncio.Event | None = None, rearm: bool = False) -> int:
    """Run the daemon until `stop` is set (or SIGTERM/SIGINT). Returns the exit code.

    `rearm`: arm the config's positions even though the store was lost (see GuardLoop.recover).
    """
    daemon = await build(config)
    daemon.rearm = rearm
    return await serve(daemon, stop=stop)


async def serve(daemon: Daemon, *, stop: asyncio.Event | None = None) -> int:
    """Run a built daemon until `stop` is set (or SIGTERM/SIGINT), then close it.

    Returns the exit code. Tests reach into the daemon (its broker's faults,
    its guard_loop) between `build` and `serve`.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await _serve(daemon, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await daemon.session.close()
        if daemon.store is not None:
            if daemon.store.salvage():  # its file vanished under us: nothing of it is lost
                log.critical(
                    "[GUARD] the state store was deleted while running; written back to %s",
                    daemon.store.path,
                )
            daemon.store.close()
        elif isinstance(daemon.state, PostgresStore):
            await daemon.state.close()
        daemon.notifier.close()


async def _serve(d: Daemon, stop: asyncio.Event) -> int:
    if d.leadership is None:  # a lone instance guards from the start
        await _load(d, settle=0.0)
    await d.guard_loop.sweep()  # the guard loop has run once before READY
    host, port = d.config.http.host, d.config.http.port
    # Connection, time and log bounds of the API: see tickguard.http_server.
    app = build_app(d.port, d.metrics.registry)
    server = ApiServer(app, host, port, shutdown_timeout=API_SHUTDOWN_TIMEOUT)
    try:
        await server.start()
    except OSError as exc:
        log.error("[HTTP] cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        return 1
    bound = server.addresses[0]
    log.info("[HTTP] listening on %s:%d", bound[0], bound[1])
    if d.port.token is None:
        log.warning("[HTTP] no API token configured: mutating routes answer 503")
    failed = d.guard_loop.fatal  # set when the journal fails or a task keeps crashing
    d.tasks = [
        _keep_running(d, "feed", d.supervisor.run, failed),
        _keep_running(d, "guard", d.guard_loop.run, failed),
        _keep_running(
            d,
            "watchdog",
            lambda: d.notifier.watchdog(lambda: _progress(d), d.metrics),
            failed,
        ),
        _keep_running(d, "lag", lambda: measure_lag(d.metrics), failed),
        _keep_running(d, "status", lambda: _status_loop(d), failed),
    ]
    if d.poller is not None:
        d.tasks.append(_keep_running(d, "poll", d.poller.run, failed))
    if d.leadership is None:
        _start_guarding(d, failed)
    else:  # docs/ha.md: stand by (feed connected, prices warm) until the lead is free
        d.tasks.append(asyncio.create_task(_lead(d, failed), name="ha"))
    # Everything built so far lives as long as the process: out of the collector's sight
    # (gc.freeze), a full collection looks only at what was made since. Before, one took
    # 30-150 ms of the guard loop every few minutes under load, all at once (docs/benchmarks.md).
    gc.freeze()
    d.notifier.ready(d.snapshot().status_line(d.monotonic()))
    if d.leadership is None:
        log.info(
            "tickguard %s running: %d positions guarded", __version__, len(d.guard.positions())
        )
    else:
        log.info(
            "tickguard %s running as %s: standing by until it leads (docs/ha.md)",
            __version__,
            d.leadership.me,
        )
    stopper = asyncio.create_task(stop.wait())
    crashed = asyncio.create_task(failed.wait())
    await asyncio.wait([stopper, crashed], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    crashed.cancel()
    code = 1 if failed.is_set() else 0
    log.info("shutting down (%s)", "fatal error" if code else "signal")
    d.notifier.stopping()
    await server.close()  # stop accepting requests
    if not await d.executor.drain(SHUTDOWN_EXIT_WAIT):
        log.warning("exits still in flight at shutdown; they resume (reconciled) on the next start")
    for task in d.tasks:
        task.cancel()
    await asyncio.gather(*d.tasks, return_exceptions=True)
    await d.executor.cancel_all()
    if d.guard_loop.guarding:
        try:
            await d.guard_loop.save_all()
        except StoreError as exc:  # a lost lead's store refuses, as it should
            log.error("trailing anchors not saved at shutdown: %s", exc)
    gc.unfreeze()  # a process that runs daemons in turn (the tests) collects each one whole
    return code


async def _load(d: Daemon, *, settle: float) -> None:
    """Take up the store's positions and the exits in flight (each looked up before any
    send; not before `settle` since its last journal write), then the config's positions."""
    if d.safety_net is not None:
        await d.safety_net.load()  # before an exit resumed by recover() can disarm
    await d.guard_loop.recover(d.config.positions, rearm=d.rearm, settle=settle)


def _start_guarding(d: Daemon, failed: asyncio.Event) -> None:
    """The tasks only the instance that guards runs: the account and the safety net."""
    d.tasks.append(_keep_running(d, "account", d.reconciler.run, failed))
    if d.safety_net is not None:
        d.tasks.append(_keep_running(d, "safety_net", d.safety_net.run, failed))


async def _lead(d: Daemon, failed: asyncio.Event) -> None:
    """Stand by, take over when the lead is free (docs/ha.md), lead; when the lead is lost
    (or the shared store cannot be reached), stop the daemon: exit 1, nothing more sent."""
    assert d.leadership is not None

    async def take_over() -> None:
        # 1. positions and the journal; 2. every exit in flight looked up by client order
        # id (once the previous leader's order, if any, can no longer be on its way);
        # 3. the account reconciled (SPEC 8); 4. then guard.
        await _load(d, settle=d.config.store.takeover_settle)
        await d.reconciler.reconcile(FETCH_TIMEOUT)
        d.guard_loop.guarding = True
        await d.guard_loop.sweep()
        _start_guarding(d, failed)

    try:
        await d.leadership.run(take_over)
    except Exception:
        log.exception("[HA] leadership failed")
    failed.set()


def _progress(d: Daemon) -> int:
    """What the watchdog sees move: the guard loop's sweeps, and a standby's tries."""
    tries = d.leadership.tries if d.leadership is not None else 0
    return d.guard_loop.sweeps + tries


def _keep_running(
    d: Daemon, name: str, factory: Callable[[], Coroutine[Any, Any, None]], failed: asyncio.Event
) -> asyncio.Task[None]:
    async def loop() -> None:
        crashes: list[float] = []
        while True:
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                now = d.monotonic()
                crashes = [t for t in crashes if now - t < CRASH_WINDOW] + [now]
                if d.task_crashes is not None:
                    d.task_crashes.labels(name).inc()
                log.exception("task %s crashed (%d in %.0fs)", name, len(crashes), CRASH_WINDOW)
                if len(crashes) > CRASHES_TOLERATED:
                    log.critical(
                        "task %s keeps crashing; exiting so systemd restarts tickguard", name
                    )
                    failed.set()
                    return
                await asyncio.sleep(Exponential(CRASH_PAUSE, CRASH_PAUSE_MAX).delay(len(crashes)))

    return asyncio.create_task(loop(), name=name)


async def _status_loop(d: Daemon) -> None:
    """systemd's STATUS= line, from a snapshot each second (also the API's newest one)."""
    while True:
        snapshot = d.snapshot()
        d.port.publish(snapshot)
        d.notifier.status(snapshot.status_line(d.monotonic()))
        await asyncio.sleep(1.0)
