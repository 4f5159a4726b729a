"""The guard's fast check (`Guard.due`, and the sweep's) leaves out only evaluations that
would do nothing.

Two guards, each with its own price book, get the same operations: ticks in
batches, sweeps, the market opening and closing, the socket going down and
up, closes, broker answers, positions resized, added and removed. One judges
every symbol a batch changed, and every position at a sweep (what the guard
did before the fast check); the other judges only `due`'s, after
`note_market`, as GuardLoop.on_prices does, and sweeps with `Guard.sweep`.
After every step their events, positions, blind and held flags, exits and
quotes must be the same.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tickguard.core.exits import ExitState
from tickguard.core.guard import BlindPolicy, Event, Guard, _calm
from tickguard.core.positions import ExitReason, Position, PositionSpec, PositionState, Side
from tickguard.core.prices import PriceBook, PriceSource

LIVE, POLL = PriceSource.LIVE, PriceSource.POLL
GUARDABLE = "ABCD"
SYMBOLS = GUARDABLE + "XY"  # X and Y are never guarded
WALL = 1_767_765_000.0


class Tick:
    def __init__(self, symbol: str, price: float, exchange_ts: int | None) -> None:
        self.symbol, self.price, self.exchange_ts = symbol, price, exchange_ts


def guard(policy: BlindPolicy) -> Guard:
    book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
    return Guard(book, blind_policy=policy, blind_after=20.0, install_id="t")


specs = st.builds(
    lambda side, sl, tp, trail, entry: (side, sl, tp, trail, entry),
    st.sampled_from([Side.LONG, Side.SHORT]),
    st.one_of(st.none(), st.floats(5, 15)),  # distance of the stop from the entry
    st.one_of(st.none(), st.floats(5, 15)),  # distance of the target
    st.one_of(st.none(), st.floats(1, 8)),  # trailing distance
    st.floats(95, 105),
)


def full_sweep(g: Guard, now: float, market_open: bool) -> list[Event]:
    """Every position evaluated, in order: what the sweep did before it left calm ones out."""
    g.note_market(now, market_open)
    return [e for symbol in g.symbols() for e in g.evaluate(symbol, now, WALL, market_open)]


class DueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        policy = BlindPolicy.CLOSE
        self.full, self.fast = guard(policy), guard(policy)
        for g in self.both():
            g.book.channel_up(LIVE, 0.0)
        self.now = 0.0
        self.market = True
        self.next_id = 1
        self.stamp = 0

    def both(self) -> tuple[Guard, Guard]:
        return self.full, self.fast

    # -- positions ------------------------------------------------------

    @rule(symbol=st.sampled_from(GUARDABLE), spec=specs)
    def add(
        self, symbol: str, spec: tuple[Side, float | None, float | None, float | None, float]
    ) -> None:
        if self.full.position(symbol) is not None:
            return
        side, sl, tp, trail, entry = spec
        below, above = (-1, 1) if side is Side.LONG else (1, -1)
        position = Position(
            self.next_id,
            PositionSpec(
                symbol,
                side,
                10.0,
                entry,
                stop_loss=None if sl is None else entry + below * sl,
                take_profit=None if tp is None else entry + above * tp,
                trailing_stop=trail,
            ),
        )
        self.next_id += 1
        for g in self.both():
            g.add(position, self.now)
        self.compare(self.full.evaluate(symbol, self.now, WALL, self.market),
                     self.fast.evaluate(symbol, self.now, WALL, self.market))  # fmt: skip

    @rule(symbol=st.sampled_from(GUARDABLE))
    def remove(self, symbol: str) -> None:
        position = self.full.position(symbol)
        if position is None or position.state is not PositionState.OPEN:
            return
        for g in self.both():
            g.remove(symbol)

    @rule(symbol=st.sampled_from(GUARDABLE), quantity=st.floats(1, 20), entry=st.floats(90, 110))
    def resize(self, symbol: str, quantity: float, entry: float) -> None:
        position = self.full.position(symbol)
        if position is None or position.state is not PositionState.OPEN:
            return
        for g in self.both():
            g.account_update(symbol, quantity, entry, confirmed=True)

    # -- prices -----------------------------------------------------------

    @rule(
        batch=st.lists(
            # Mostly near the entries (calm), sometimes past a level.
            st.tuples(
                st.sampled_from(SYMBOLS), st.floats(97, 103) | st.floats(80, 120), st.booleans()
            ),
            min_size=1,
            max_size=6,
        ),
        source=st.sampled_from([LIVE, LIVE, POLL]),
        dt=st.sampled_from([0.0, 0.5, 5.0, 40.0, 400.0]),
    )
    def ticks(self, batch: list[tuple[str, float, bool]], source: PriceSource, dt: float) -> None:
        self.now += dt
        ticks = []
        for symbol, price, stamped in batch:
            self.stamp += 1
            ticks.append(Tick(symbol, round(price, 1), self.stamp if stamped else None))
        taken = self.full.book.take(ticks, source, self.now)
        assert self.fast.book.take(ticks, source, self.now) == taken
        if not taken:
            return
        full: list[Event] = []
        for symbol in taken:  # before the fast check: every symbol judged
            full.extend(self.full.evaluate(symbol, self.now, WALL, self.market))
        fast: list[Event] = []
        due = self.fast.due(taken)
        if due is not None:
            self.fast.note_market(self.now, self.market)
            for symbol in due:
                fast.extend(self.fast.evaluate(symbol, self.now, WALL, self.market))
            skipped = sum(1 for s in taken if self.fast.position(s)) - len(due)
            if skipped:
                event("guarded ticks left out")
        else:
            assert not any(self.full.position(s) for s in taken)
        self.compare(full, fast)

    @rule(dt=st.sampled_from([0.0, 1.0, 25.0, 400.0]))
    def sweep(self, dt: float) -> None:
        self.now += dt
        self.compare(
            full_sweep(self.full, self.now, self.market),
            self.fast.sweep(self.now, WALL, self.market),
        )

    @rule()
    def market_turns(self) -> None:
        self.market = not self.market

    @rule(up=st.booleans(), source=st.sampled_from([LIVE, POLL]))
    def channel(self, up: bool, source: PriceSource) -> None:
        for g in self.both():
            if up:
                g.book.channel_up(source, self.now)
            else:
                g.book.channel_down(source)

    # -- exits --------------------------------------------------------------

    @rule(symbol=st.sampled_from(GUARDABLE))
    def close(self, symbol: str) -> None:
        if self.full.position(symbol) is None:
            return
        full = self.full.close(symbol, ExitReason.EMERGENCY, self.now, WALL)
        fast = self.fast.close(symbol, ExitReason.EMERGENCY, self.now, WALL)
        assert full == fast

    @precondition(lambda self: bool(self.full.exits_in_flight()))
    @rule(
        data=st.data(),
        outcome=st.sampled_from(["send", "fill", "part", "reject", "cancel", "unavailable"]),
    )
    def answer(self, data: st.DataObject, outcome: str) -> None:
        exit = data.draw(st.sampled_from(self.full.exits_in_flight()))
        cid = exit.client_order_id
        sent = exit.state is ExitState.SENT
        if (outcome == "send" and sent) or (outcome == "cancel" and sent):
            return  # not a transition an exit makes (tickguard.core.exits)
        for g in self.both():
            if outcome == "send":
                g.exit_sending(cid)
            elif outcome == "fill":
                g.exit_filled(cid, 100.0, "b")
            elif outcome == "part":
                g.exit_filled(cid, 100.0, "b", quantity=exit.quantity / 2)
            elif outcome == "reject":
                g.exit_rejected(cid, "no", self.now)
            elif outcome == "cancel":
                g.exit_cancelled(cid, "flat", self.now)
            else:
                g.exit_unavailable(cid, "down", self.now)

    # -- the same guard, either way ---------------------------------------------

    def compare(self, full: list[Event], fast: list[Event]) -> None:
        assert fast == full
        for e in full:
            event(type(e).__name__)  # hypothesis statistics: what the runs exercised

    @invariant()
    def same_state(self) -> None:
        assert self.fast.view() == self.full.view()
        assert self.fast.exits_in_flight() == self.full.exits_in_flight()
        for symbol in SYMBOLS:
            assert self.fast.quote(symbol, self.now) == self.full.quote(symbol, self.now)


TestDueMachine = DueMachine.TestCase
TestDueMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)


def test_the_fast_check_leaves_out_calm_ticks_and_nothing_else() -> None:
    """Guarded live prices between the levels are left out; unguarded symbols are not
    looked at; a price past a level, or not live, is due."""
    g = guard(BlindPolicy.HOLD)
    g.book.channel_up(LIVE, 0.0)
    spec = PositionSpec("A", Side.LONG, 1, 100.0, stop_loss=90.0, take_profit=110.0)
    g.add(Position(1, spec), 0.0)
    assert g.due(["X", "Y"]) is None  # none guarded: nothing to tell the guard at all
    g.book.take([Tick("A", 100.0, None)], LIVE, 1.0)
    assert g.due(["A", "X"]) == []
    for price in (90.0, 89.0, 110.0, 111.0):  # on a level is past it
        g.book.take([Tick("A", price, None)], LIVE, 1.0)
        assert g.due(["A"]) == ["A"], price
    g.book.take([Tick("A", 100.0, None)], POLL, 1.0)
    assert g.due(["A"]) == ["A"]  # a poll price: judged in full


@pytest.mark.parametrize(
    ("side", "calm", "not_calm"),
    [  # the anchor is the entry, 100; the trailing level 4 away from it
        (Side.LONG, [96.01, 99.99, 100.0], [96.0, 95.0, math.nextafter(100.0, math.inf), 101.0]),
        (Side.SHORT, [100.0, 100.01, 103.99], [104.0, 105.0, math.nextafter(100.0, 0.0), 99.0]),
    ],
)
def test_a_trailing_stop_is_calm_from_its_level_to_its_anchor(
    side: Side, calm: list[float], not_calm: list[float]
) -> None:
    """A price at the anchor leaves it, one beyond moves it; the first price sets it, so before
    it none is calm; nor while a blind state is to be cleared."""
    position = Position(1, PositionSpec("A", side, 1, 100.0, trailing_stop=4.0))
    assert _calm(position, True) == (math.inf, -math.inf)  # no anchor yet
    anchored = position.ratchet(100.0)
    assert anchored.trail_anchor == 100.0
    low, high = _calm(anchored, True)
    for price in calm:
        assert low < price < high, price
        assert anchored.ratchet(price) is anchored
    for price in not_calm:
        assert not low < price < high, price
    assert _calm(anchored, False) == (math.inf, -math.inf)  # a blind state to clear


def test_an_exiting_position_is_calm_at_any_price_unless_blind() -> None:
    position = Position(1, PositionSpec("A", Side.LONG, 1, 100.0, stop_loss=90.0))
    exiting = Position(1, position.spec, state=PositionState.EXITING, exit_id="x")
    assert _calm(exiting, True) == (-math.inf, math.inf)
    assert _calm(exiting, False) == (math.inf, -math.inf)


def test_exits_in_flight_states_are_unchanged_by_the_fast_check() -> None:
    """A position exiting stays exiting through calm ticks; its exit is not asked again."""
    g = guard(BlindPolicy.HOLD)
    g.book.channel_up(LIVE, 0.0)
    g.add(Position(1, PositionSpec("A", Side.LONG, 1, 100.0, stop_loss=90.0)), 0.0)
    g.book.take([Tick("A", 80.0, None)], LIVE, 1.0)
    assert g.due(["A"]) == ["A"]
    (event,) = g.evaluate("A", 1.0, WALL, True)
    assert event.exit.state is ExitState.PENDING  # type: ignore[union-attr]
    g.book.take([Tick("A", 70.0, None)], LIVE, 2.0)
    assert g.due(["A"]) == []
    assert g.evaluate("A", 2.0, WALL, True) == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_long_random_walk_decides_the_same_either_way(seed: int) -> None:
    """Thousands of ticks over mixed positions (stops, targets, trailing stops, both sides),
    with outages, closed spells, sweeps and broker answers: the same events and state,
    while many guarded ticks are left out."""
    rng = random.Random(seed)
    full, fast = guard(BlindPolicy.HOLD), guard(BlindPolicy.HOLD)
    symbols = [f"S{i}" for i in range(30)]
    prices = dict.fromkeys(symbols, 100.0)
    for i, symbol in enumerate(symbols[:20]):
        side = Side.LONG if i % 2 else Side.SHORT
        sign = -1 if side is Side.LONG else 1
        spec = PositionSpec(
            symbol,
            side,
            10.0,
            100.0,
            stop_loss=100.0 + sign * rng.uniform(3, 12) if i % 3 else None,
            take_profit=100.0 - sign * rng.uniform(3, 12) if i % 4 else None,
            trailing_stop=rng.uniform(1, 6) if i % 5 else None,
        )
        for g in (full, fast):
            g.add(Position(i + 1, spec), 0.0)
            g.book.channel_up(LIVE, 0.0)
    now, market, stamp, left_out, judged = 0.0, True, 0, 0, 0
    for _ in range(3000):
        now += rng.choice([0.0, 0.01, 0.1, 1.0])
        roll = rng.random()
        if roll < 0.01:
            market = not market
        elif roll < 0.02:
            for g in (full, fast):
                if g.book.channel_healthy(LIVE):
                    g.book.channel_down(LIVE)
                else:
                    g.book.channel_up(LIVE, now)
        elif roll < 0.04:
            assert fast.sweep(now, WALL, market) == full_sweep(full, now, market)
        elif roll < 0.06 and full.exits_in_flight():
            exit = rng.choice(full.exits_in_flight())
            refused = rng.random() < 0.5
            for g in (full, fast):
                if refused:
                    g.exit_rejected(exit.client_order_id, "no", now)
                else:
                    g.exit_filled(exit.client_order_id, 100.0, "b")
        batch = []
        for symbol in rng.sample(symbols, rng.choice([1, 3, 10])):
            prices[symbol] = max(50.0, prices[symbol] * (1 + rng.gauss(0, 0.004)))
            stamp += 1
            batch.append(Tick(symbol, round(prices[symbol], 2), stamp))
        taken = full.book.take(batch, LIVE, now)
        assert fast.book.take(batch, LIVE, now) == taken
        expected = [e for s in taken for e in full.evaluate(s, now, WALL, market)]
        got: list[Event] = []
        due = fast.due(taken)
        if due is not None:
            fast.note_market(now, market)
            got = [e for s in due for e in fast.evaluate(s, now, WALL, market)]
            guarded = sum(1 for s in taken if fast.position(s) is not None)
            left_out += guarded - len(due)
            judged += guarded
        assert got == expected
        assert fast.view() == full.view()
        assert fast.exits_in_flight() == full.exits_in_flight()
    # The check did leave many guarded ticks out (the socket is down half the run: those
    # prices are not live, and are all judged).
    assert left_out > judged / 3
