"""The guard: exits decided once, on fallback prices too, never on unusable ones."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tickguard.core.exits import ExitState
from tickguard.core.guard import (
    BlindChanged,
    BlindPolicy,
    ExitDecided,
    Guard,
    HeldForOpen,
    PositionExists,
)
from tickguard.core.positions import ExitReason, Position, PositionSpec, PositionState, Side
from tickguard.core.prices import PriceBook, PriceSource

LIVE, POLL, CACHE = PriceSource.LIVE, PriceSource.POLL, PriceSource.CACHE


def make(policy: BlindPolicy = BlindPolicy.HOLD, blind_after: float = 60.0) -> Guard:
    book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
    return Guard(book, blind_policy=policy, blind_after=blind_after, install_id="t")


def long(symbol: str = "A", pid: int = 1, **kw: float) -> Position:
    return Position(pid, PositionSpec(symbol, Side.LONG, 10.0, 100.0, **kw))


def tick(g: Guard, symbol: str, price: float, now: float, source: PriceSource = LIVE) -> list:
    g.book.update(symbol, price, None, source, now)
    return g.evaluate(symbol, now, 1_700_000_000.0 + now, market_open=True)


def decided(events: list) -> list[ExitDecided]:
    return [e for e in events if isinstance(e, ExitDecided)]


def test_stop_fires_once_on_live_tick() -> None:
    """A live tick through the stop decides one stop_loss exit priced live."""
    g = make()
    g.book.channel_up(LIVE, 0.0)
    g.add(long(stop_loss=95), 0.0)
    assert tick(g, "A", 96, 1.0) == []
    (d,) = decided(tick(g, "A", 94, 2.0))
    assert d.exit.reason is ExitReason.STOP_LOSS and d.exit.price_source is LIVE
    assert d.exit.trigger_price == 94 and d.exit.client_order_id == "t-1-1".replace("t-", "tg-t-")
    assert d.position.state is PositionState.EXITING
    assert decided(tick(g, "A", 90, 3.0)) == []
    assert decided(g.sweep(4.0, 0.0, True)) == []


def test_poll_and_cache_prices_fire_with_their_source() -> None:
    """Exits keep firing on fallback prices and record poll or cache as their source."""
    g = make()
    g.add(long(stop_loss=95), 0.0)
    g.book.channel_up(POLL, 0.0)
    (d,) = decided(tick(g, "A", 94, 1.0, POLL))
    assert d.exit.price_source is POLL

    g2 = make()
    g2.add(long(take_profit=110), 0.0)
    g2.book.channel_up(LIVE, 0.0)
    g2.book.update("A", 111, None, LIVE, 0.0)
    g2.book.channel_down(LIVE)
    (d2,) = decided(g2.sweep(45.0, 0.0, True))
    assert d2.exit.price_source is CACHE and d2.exit.reason is ExitReason.TAKE_PROFIT
    assert d2.quote.age == 45.0


def test_unusable_price_never_fires() -> None:
    """A price older than cache_timeout does not close a position, however far through the stop."""
    g = make()
    g.add(long(stop_loss=95), 0.0)
    g.book.update("A", 1.0, None, POLL, 0.0)
    assert decided(g.sweep(301.0, 0.0, True)) == []
    g2 = make()
    g2.add(long(stop_loss=95), 0.0)
    g2.book.update("A", 1.0, None, POLL, 0.0)
    assert len(decided(g2.sweep(300.0, 0.0, True))) == 1


def test_manual_close_returns_the_exit_in_flight() -> None:
    """Closing an exiting position returns its exit instead of making another."""
    g = make()
    g.add(long(stop_loss=95), 0.0)
    first = g.close("A", ExitReason.EMERGENCY, 1.0, 0.0)
    assert first.created and first.exit.price_source is PriceSource.MANUAL
    assert first.exit.trigger_price is None
    second = g.close("A", ExitReason.EMERGENCY, 2.0, 0.0)
    assert not second.created and second.exit == first.exit and second.event is None
    with pytest.raises(KeyError):
        g.close("B", ExitReason.EMERGENCY, 2.0, 0.0)


def test_fill_closes_and_unguards() -> None:
    """A fill closes the position and removes it from the guard."""
    g = make()
    g.add(long(stop_loss=95), 0.0)
    cid = g.close("A", ExitReason.EMERGENCY, 1.0, 0.0).exit.client_order_id
    g.exit_sending(cid)
    exit, position = g.exit_filled(cid, 93.0, "B1")
    assert exit.state is ExitState.FILLED and position.state is PositionState.CLOSED
    assert g.position("A") is None and g.exits_in_flight() == []


def test_rejection_rearms_after_a_hold() -> None:
    """A refused exit reopens the position; its rule fires again only after a growing hold."""
    g = make()
    g.add(long(stop_loss=95), 0.0)
    (d,) = decided(tick(g, "A", 94, 1.0, POLL))
    g.exit_sending(d.exit.client_order_id)
    _, p = g.exit_rejected(d.exit.client_order_id, "no margin", 1.0)
    assert p.state is PositionState.OPEN and p.exit_id is None
    assert decided(g.sweep(1.5, 0.0, True)) == []
    (d2,) = decided(g.sweep(2.0, 0.0, True))
    assert d2.exit.client_order_id.endswith("-2")
    g.exit_sending(d2.exit.client_order_id)
    g.exit_rejected(d2.exit.client_order_id, "no", 2.0)
    assert decided(g.sweep(3.5, 0.0, True)) == []
    assert len(decided(g.sweep(4.0, 0.0, True))) == 1


def test_retry_is_due_after_delay() -> None:
    """An unavailable broker puts the exit in retry, due after its delay."""
    g = make()
    g.add(long(), 0.0)
    cid = g.close("A", ExitReason.EMERGENCY, 0.0, 0.0).exit.client_order_id
    g.exit_sending(cid)
    e = g.exit_unavailable(cid, "timeout", 10.0)
    assert g.due_retries(10.0) == [] and g.due_retries(e.retry_at or 0) == [g.exit(cid)]


def test_add_rules() -> None:
    """One position per symbol; closed ones are refused; exiting ones need their exit."""
    g = make()
    g.add(long(), 0.0)
    with pytest.raises(PositionExists, match=r"already has an? open"):
        g.add(long(pid=2), 0.0)
    closed = Position(3, PositionSpec("C", Side.LONG, 1, 1), PositionState.CLOSED)
    with pytest.raises(ValueError, match="closed"):
        g.add(closed, 0.0)
    exiting = Position(4, PositionSpec("D", Side.LONG, 1, 1), PositionState.EXITING, exit_id="x")
    with pytest.raises(ValueError, match="exiting iff"):
        g.add(exiting, 0.0)


def test_recovered_exit_is_in_flight() -> None:
    """A position recovered while exiting comes back with its exit in flight."""
    g = make()
    g.add(long(), 0.0)
    cid = g.close("A", ExitReason.EMERGENCY, 0.0, 0.0).exit.client_order_id
    exit, position = g.exit(cid), g.position("A")
    assert exit is not None and position is not None
    g2 = make()
    g2.add(position, 0.0, exit)
    assert g2.close("A", ExitReason.EMERGENCY, 0.0, 0.0).exit == exit
    wrong = exit.sending().filled(1.0, "b")
    with pytest.raises(ValueError, match="not in flight"):
        make().add(position, 0.0, wrong)


def test_remove() -> None:
    """Removing stops guarding an open position; an exiting one cannot be removed."""
    g = make()
    g.add(long(), 0.0)
    g.add(long("B", 2), 0.0)
    assert g.remove("A").symbol == "A" and g.symbols() == ["B"]
    g.close("B", ExitReason.EMERGENCY, 0.0, 0.0)
    with pytest.raises(ValueError, match="exiting"):
        g.remove("B")
    with pytest.raises(KeyError):
        g.remove("Z")


def test_blind_hold_raises_and_clears_flag() -> None:
    """Hold: a symbol with no usable price for blind_after (market open) is flagged, then cleared."""
    g = make(BlindPolicy.HOLD, blind_after=60.0)
    g.add(long(stop_loss=95), 0.0)
    assert g.sweep(0.0, 0.0, True) == []
    assert g.sweep(59.0, 0.0, True) == []
    (ev,) = g.sweep(60.0, 0.0, True)
    assert isinstance(ev, BlindChanged) and ev.blind and g.is_blind("A")
    g.book.update("A", 100.0, None, POLL, 61.0)
    (ev,) = g.sweep(61.0, 0.0, True)
    assert isinstance(ev, BlindChanged) and not ev.blind and not g.is_blind("A")
    assert not g.is_blind("Z")


def test_blind_clock_runs_only_while_market_open() -> None:
    """Closed-market time does not count towards blind_after."""
    g = make(BlindPolicy.HOLD, blind_after=60.0)
    g.add(long(), 0.0)
    assert g.sweep(1000.0, 0.0, False) == []
    assert g.sweep(1001.0, 0.0, True) == []
    assert g.sweep(1060.0, 0.0, True) == []
    assert len(g.sweep(1061.0, 0.0, True)) == 1


def test_blind_counts_from_when_price_became_unusable() -> None:
    """blind_after starts when the last price crossed cache_timeout."""
    g = make(BlindPolicy.CLOSE, blind_after=60.0)
    g.add(long(stop_loss=50), 0.0)
    g.book.update("A", 100.0, None, POLL, 0.0)
    g.sweep(0.0, 0.0, True)
    assert g.sweep(350.0, 0.0, True) == []  # unusable since 300
    events = g.sweep(360.0, 0.0, True)
    (d,) = decided(events)
    assert d.exit.reason is ExitReason.BLIND and d.exit.price_source is PriceSource.NONE
    assert decided(g.sweep(400.0, 0.0, True)) == []


def test_evaluate_unknown_symbol_is_quiet() -> None:
    """A tick for a symbol nobody guards decides nothing."""
    assert make().evaluate("Z", 0.0, 0.0, True) == []


@given(st.lists(st.floats(50.0, 150.0), min_size=1, max_size=40), st.floats(60.0, 99.0))
def test_path_crossing_sl_closes_long_exactly_once(path: list[float], sl: float) -> None:
    """A price path that crosses SL (and no TP) decides exactly one stop_loss exit."""
    path = [*path, sl - 1.0, sl - 2.0, sl + 5.0]
    g = make()
    g.book.channel_up(LIVE, 0.0)
    g.add(long(stop_loss=sl), 0.0)
    exits = []
    for i, price in enumerate(path):
        exits += decided(tick(g, "A", price, float(i)))
        exits += decided(g.sweep(float(i) + 0.5, 0.0, True))
    assert len(exits) == 1 and exits[0].exit.reason is ExitReason.STOP_LOSS


@given(
    st.lists(st.tuples(st.floats(1.0, 200.0), st.floats(0.0, 1000.0)), max_size=30),
    st.sampled_from([Side.LONG, Side.SHORT]),
)
def test_unusable_price_never_fires_property(steps: list[tuple[float, float]], side: Side) -> None:
    """Whatever the price, a quote older than cache_timeout never decides an exit."""
    g = make(BlindPolicy.HOLD)
    g.add(Position(1, PositionSpec("A", side, 1, 100, stop_loss=None, trailing_stop=1.0)), 0.0)
    now = 0.0
    for price, gap in steps:
        g.book.update("A", price, None, POLL, now)
        now += 300.001 + gap  # always beyond cache_timeout when judged
        assert decided(g.sweep(now, 0.0, True)) == []


class GuardMachine(RuleBasedStateMachine):
    """Random interleavings of ticks, sweeps, closes and broker answers."""

    def __init__(self) -> None:
        super().__init__()
        self.g = make(BlindPolicy.CLOSE, blind_after=5.0)
        self.now = 0.0
        self.sent: list[str] = []  # client order ids with a send in progress
        self.filled: dict[int, int] = {}
        for pid, sym in enumerate("ABC", 1):
            self.g.add(long(sym, pid, stop_loss=90, take_profit=110, trailing_stop=4), 0.0)

    def _clock(self, dt: float) -> None:
        self.now += dt

    @rule(
        sym=st.sampled_from("ABC"),
        price=st.floats(80, 120),
        dt=st.floats(0, 50),
        source=st.sampled_from([LIVE, POLL]),
    )
    def tick(self, sym: str, price: float, dt: float, source: PriceSource) -> None:
        self._clock(dt)
        self.g.book.update(sym, price, None, source, self.now)
        self.g.evaluate(sym, self.now, 0.0, True)

    @rule(dt=st.floats(0, 400), market=st.booleans())
    def sweep(self, dt: float, market: bool) -> None:
        self._clock(dt)
        self.g.sweep(self.now, 0.0, market)

    @rule(sym=st.sampled_from("ABC"))
    def close(self, sym: str) -> None:
        if self.g.position(sym) is not None:
            self.g.close(sym, ExitReason.EMERGENCY, self.now, 0.0)

    @rule(up=st.booleans())
    def channel(self, up: bool) -> None:
        if up:
            self.g.book.channel_up(LIVE, self.now)
        else:
            self.g.book.channel_down(LIVE)

    @precondition(lambda self: any(e.state.name != "SENT" for e in self.g.exits_in_flight()))
    @rule(data=st.data())
    def send(self, data: st.DataObject) -> None:
        ready = [e for e in self.g.exits_in_flight() if e.state is not ExitState.SENT]
        exit = data.draw(st.sampled_from(ready))
        self.g.exit_sending(exit.client_order_id)

    @precondition(lambda self: any(e.state is ExitState.SENT for e in self.g.exits_in_flight()))
    @rule(data=st.data(), outcome=st.sampled_from(["fill", "reject", "timeout"]))
    def answer(self, data: st.DataObject, outcome: str) -> None:
        sent = [e for e in self.g.exits_in_flight() if e.state is ExitState.SENT]
        exit = data.draw(st.sampled_from(sent))
        cid = exit.client_order_id
        if outcome == "fill":
            self.g.exit_filled(cid, 100.0, "b")
            self.filled[exit.position_id] = self.filled.get(exit.position_id, 0) + 1
        elif outcome == "reject":
            self.g.exit_rejected(cid, "no", self.now)
        else:
            self.g.exit_unavailable(cid, "timeout", self.now)

    @invariant()
    def at_most_one_exit_in_flight_per_position(self) -> None:
        ids = [e.position_id for e in self.g.exits_in_flight()]
        assert len(ids) == len(set(ids))
        for p in self.g.positions():
            in_flight = [e for e in self.g.exits_in_flight() if e.position_id == p.id]
            assert (p.state is PositionState.EXITING) == bool(in_flight)
            if in_flight:
                assert in_flight[0].client_order_id == p.exit_id

    @invariant()
    def at_most_one_fill_per_position(self) -> None:
        assert all(n == 1 for n in self.filled.values())
        assert not {p.id for p in self.g.positions()} & set(self.filled)


TestGuardMachine = GuardMachine.TestCase
TestGuardMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_positions_lists_guarded_positions_as_they_change() -> None:
    """positions() lists every guarded position in its current state and drops filled ones."""
    g = make()
    assert g.positions() == []
    g.add(long("A", 1), 0.0)
    g.add(long("B", 2), 0.0)
    assert [(p.symbol, p.state) for p in g.positions()] == [
        ("A", PositionState.OPEN),
        ("B", PositionState.OPEN),
    ]
    cid = g.close("A", ExitReason.EMERGENCY, 1.0, 0.0).exit.client_order_id
    assert [(p.symbol, p.state) for p in g.positions()] == [
        ("A", PositionState.EXITING),
        ("B", PositionState.OPEN),
    ]
    g.exit_sending(cid)
    g.exit_filled(cid, 99.0, "b")
    assert [p.symbol for p in g.positions()] == ["B"]


def test_quote_ages_a_guarded_symbol_from_when_it_was_guarded() -> None:
    """A guarded symbol without a price is aged from its guarding; an unknown one never had an age."""
    g = make()
    g.add(long("A"), 10.0)
    guarded = g.quote("A", 25.0)
    assert guarded.price is None and guarded.age == 15.0 and not guarded.usable
    unknown = g.quote("Z", 25.0)
    assert unknown.price is None and unknown.age == float("inf")
    assert unknown.source is PriceSource.NONE


def test_quote_source_follows_channel_health() -> None:
    """A guarded symbol's quote is live while the socket is healthy and cache once it is down."""
    g = make()
    g.add(long("A"), 0.0)
    g.book.channel_up(LIVE, 0.0)
    g.book.update("A", 101.0, None, LIVE, 1.0)
    assert g.book.channel_healthy(LIVE) and not g.book.channel_healthy(POLL)
    q = g.quote("A", 50.0)
    assert (q.source, q.age, q.price and q.price.value) == (LIVE, 0.0, 101.0)
    g.book.channel_down(LIVE)
    assert not g.book.channel_healthy(LIVE)
    q = g.quote("A", 50.0)
    assert (q.source, q.age) == (CACHE, 49.0) and q.usable


def held(events: list) -> list[HeldForOpen]:
    return [e for e in events if isinstance(e, HeldForOpen)]


def test_market_closed_holds_a_crossing_and_says_so_once() -> None:
    """Closed market: a crossed stop sends nothing, is said once, and the position stays armed."""
    g = make()
    g.book.channel_up(POLL, 0.0)
    g.add(long(stop_loss=95), 0.0)
    g.sweep(0.0, 0.0, market_open=False)
    g.book.update("A", 94, None, POLL, 1.0)
    (h,) = held(g.evaluate("A", 1.0, 0.0, market_open=False))
    assert h.trigger.reason is ExitReason.STOP_LOSS and h.position.symbol == "A"
    for t in (2.0, 3.0):
        g.book.update("A", 93, None, POLL, t)
        assert g.evaluate("A", t, 0.0, market_open=False) == []
        assert g.sweep(t, 0.0, market_open=False) == []
    position = g.position("A")
    assert position is not None and position.state is PositionState.OPEN
    assert g.exits_in_flight() == [] and g.held_for_open() == ["A"]


def test_at_the_open_only_a_price_received_after_it_fires() -> None:
    """After the open the closed market's price fires nothing; the first price received after it does."""
    g = make()
    g.book.channel_up(POLL, 0.0)
    g.add(long(stop_loss=95), 0.0)
    g.book.update("A", 94, None, POLL, 1.0)
    assert held(g.sweep(1.0, 0.0, market_open=False))
    assert decided(g.sweep(10.0, 0.0, market_open=True)) == []  # 94 is from before the open
    assert decided(g.sweep(11.0, 0.0, market_open=True)) == []
    g.book.update("A", 94.5, None, POLL, 12.0)
    (d,) = decided(g.evaluate("A", 12.0, 0.0, market_open=True))
    assert d.exit.trigger_price == 94.5 and d.exit.price_source is POLL


def test_a_live_socket_price_is_current_at_the_open() -> None:
    """On a healthy socket a quiet symbol's price is current (age 0): it fires at the open."""
    g = make()
    g.book.channel_up(LIVE, 0.0)
    g.add(long(stop_loss=95), 0.0)
    g.book.update("A", 94, None, LIVE, 1.0)
    assert held(g.sweep(1.0, 0.0, market_open=False))
    (d,) = decided(g.sweep(10.0, 0.0, market_open=True))
    assert d.exit.price_source is LIVE


def test_each_closed_spell_says_held_again() -> None:
    """The hold is said once per closed spell: again after an open and a close."""
    g = make()
    g.book.channel_up(POLL, 0.0)
    g.add(long(take_profit=110), 0.0)
    g.book.update("A", 111, None, POLL, 1.0)
    assert len(held(g.sweep(1.0, 0.0, market_open=False))) == 1
    assert held(g.sweep(2.0, 0.0, market_open=False)) == []
    assert decided(g.sweep(3.0, 0.0, market_open=True)) == []  # pre-open price
    g.book.update("A", 111, None, POLL, 4.0)
    assert len(held(g.sweep(4.0, 0.0, market_open=False))) == 1


def test_emergency_close_is_sent_while_the_market_is_closed() -> None:
    """A manual close decides an exit at any hour."""
    g = make()
    g.add(long(stop_loss=95), 0.0)
    g.sweep(0.0, 0.0, market_open=False)
    request = g.close("A", ExitReason.EMERGENCY, 1.0, 0.0)
    assert request.created and request.event is not None


def test_a_resumed_exit_is_looked_up_before_any_send() -> None:
    """exit_recovered turns a sent exit into a due retry, keeping its client order id."""
    g = make()
    g.add(long(stop_loss=95), 0.0)
    request = g.close("A", ExitReason.EMERGENCY, 1.0, 0.0)
    cid = request.exit.client_order_id
    g.exit_sending(cid)
    resumed = g.exit_recovered(cid)
    assert resumed.state is ExitState.RETRY and resumed.due(0.0) and g.exit(cid) == resumed


def test_a_partly_filled_exit_leaves_the_rest_guarded() -> None:
    """4 of 10 filled: 6 stay guarded and open, and the next crossing exits them anew."""
    g = make()
    g.book.channel_up(POLL, 0.0)
    g.add(long(stop_loss=95), 0.0)
    (d,) = decided(tick(g, "A", 94, 1.0, POLL))
    cid = d.exit.client_order_id
    g.exit_sending(cid)
    exit, position = g.exit_filled(cid, 94.0, "B1", quantity=4.0)
    assert exit.state is ExitState.FILLED and exit.filled_quantity == 4.0
    assert exit.pnl(100.0) == -24.0
    assert position.state is PositionState.OPEN and position.spec.quantity == 6.0
    (again,) = decided(tick(g, "A", 93, 2.0, POLL))
    assert again.exit.client_order_id != cid and again.exit.quantity == 6.0
    g.exit_sending(again.exit.client_order_id)
    _, closed = g.exit_filled(again.exit.client_order_id, 93.0, "B2")
    assert closed.state is PositionState.CLOSED and g.position("A") is None
