"""The exit state machine: legal edges only, bounded retries."""

import pytest

from tickguard.core.exits import (
    RETRY_MAX_DELAY,
    Exit,
    ExitState,
    InvalidTransition,
    retry_delay,
)
from tickguard.core.positions import ExitReason, Side
from tickguard.core.prices import PriceSource


def exit_() -> Exit:
    return Exit(
        "tg-x-1-1", 1, "A", Side.LONG, 10, ExitReason.STOP_LOSS, PriceSource.LIVE, 99.0, 0.0
    )


def test_happy_path() -> None:
    """pending -> sent -> filled records attempts, fill price and broker id."""
    e = exit_().sending()
    assert e.state is ExitState.SENT and e.attempts == 1
    e = e.filled(98.5, "B1")
    assert e.state is ExitState.FILLED and e.fill_price == 98.5 and e.broker_order_id == "B1"
    assert not e.state.in_flight


def test_unavailable_then_retry_keeps_the_id() -> None:
    """A timed-out send waits, then is sent again under the same client order id."""
    e = exit_().sending().unavailable("timeout", now=10.0)
    assert e.state is ExitState.RETRY and e.retry_at == 10.0 + retry_delay(1)
    assert not e.due(10.0) and e.due(10.0 + retry_delay(1))
    e2 = e.sending()
    assert e2.client_order_id == e.client_order_id and e2.attempts == 2


def test_filled_found_while_reconciling_a_retry() -> None:
    """Reconciliation can find a retrying exit already filled."""
    e = exit_().sending().unavailable("timeout", 0.0).filled(97.0, "B2")
    assert e.state is ExitState.FILLED


def test_terminal_states_refuse_every_edge() -> None:
    """Filled and rejected exits cannot be sent, filled or rejected again."""
    for done in (exit_().sending().filled(1.0, "B"), exit_().sending().rejected("no")):
        for move in (
            lambda e: e.sending(),
            lambda e: e.filled(1.0, "B"),
            lambda e: e.rejected("x"),
            lambda e: e.unavailable("x", 0.0),
        ):
            with pytest.raises(InvalidTransition, match="cannot"):
                move(done)


def test_sent_cannot_be_sent_again() -> None:
    """An exit whose answer is unknown is never sent concurrently a second time."""
    with pytest.raises(InvalidTransition) as info:
        exit_().sending().sending()
    assert "while sent" in str(info.value)


def test_due_only_in_retry() -> None:
    """Only a RETRY exit is ever due."""
    assert not exit_().due(1e9)
    assert not exit_().sending().due(1e9)


def test_retry_delay_is_bounded_exponential() -> None:
    """Retry delays double from 0.5 s and stop at the cap."""
    assert [retry_delay(n) for n in (0, 1, 2, 3)] == [0.5, 0.5, 1.0, 2.0]
    assert retry_delay(100) == RETRY_MAX_DELAY


def test_repeated_failures_grow_the_delay_even_without_sends() -> None:
    """Failed lookups (no new send) still back off: the delay grows with failures in a row."""
    e = exit_().sending().unavailable("timeout", 0.0)
    first = (e.retry_at or 0.0) - 0.0
    e = e.unavailable("lookup failed", 100.0)
    e = e.unavailable("lookup failed", 200.0)
    assert e.attempts == 1 and e.failures == 3
    assert (e.retry_at or 0.0) - 200.0 == retry_delay(3) > first


def _reachable_in_flight() -> dict[str, Exit]:
    """One exit in each in-flight state, reached along the machine's own edges."""
    pending = exit_()
    sent = pending.sending()
    retry = sent.unavailable("timed out", now=5.0)
    return {
        "pending": pending,
        "sent": sent,
        "retry": retry,
        "retry after a failed lookup": pending.unavailable("lookup failed", now=1.0),
        "sent again": retry.sending(),
    }


LOOKUP_OUTCOMES = ("not found", "filled", "rejected", "lookup failed")


@pytest.mark.parametrize("crashed_in", list(_reachable_in_flight()))
@pytest.mark.parametrize("lookup", LOOKUP_OUTCOMES)
def test_recovery_is_total(crashed_in: str, lookup: str) -> None:
    """From every in-flight state a crash can leave, the resumed exit takes every lookup outcome."""
    before = _reachable_in_flight()[crashed_in]
    e = before.recovered()
    assert e.client_order_id == before.client_order_id and e.attempts == before.attempts
    assert e.state in (ExitState.PENDING, ExitState.RETRY) and e.retry_at is None
    assert e.due(0.0) or e.state is ExitState.PENDING
    if lookup == "not found":
        after = e.sending()
        assert after.state is ExitState.SENT and after.attempts == before.attempts + 1
    elif lookup == "filled":
        assert e.filled(98.0, "B").state is ExitState.FILLED
    elif lookup == "rejected":
        assert e.rejected("no").state is ExitState.REJECTED
    else:
        assert e.unavailable("down", now=1.0).state is ExitState.RETRY
    # Recovering twice (a crash during recovery) changes nothing more.
    assert e.recovered() == e


def test_every_in_flight_state_has_a_restart_transition() -> None:
    """The enumeration above covers every in-flight state; terminal ones are never resumed."""
    covered = {e.state for e in _reachable_in_flight().values()}
    assert covered == {s for s in ExitState if s.in_flight}
    done = exit_().sending().filled(1.0, "B")
    with pytest.raises(InvalidTransition):
        done.recovered()
