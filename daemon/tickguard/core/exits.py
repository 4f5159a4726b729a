"""The exit of a position: one record, a small state machine, journalled at every step.

    PENDING --sending--> SENT --filled----> FILLED   (position closed)
       ^                  |  \\--rejected--> REJECTED (no order exists; position guarded again)
       |                  \\--unavailable--> RETRY --due--> (reconcile by client order id,
       |                                                    then SENT again, same id)
       (decided and journalled before anything is sent)

A RETRY exit keeps its client order id: the broker may have the order
already, so it is looked up by that id before anything is sent again.

Recovery is total. A process can die in any in-flight state, and its
successor (or a restarted driver) resumes every such exit through
`recovered()`: PENDING stays PENDING (nothing was sent: SENT is journalled
before every send), SENT and RETRY become RETRY, due at once (the outcome
is unknown, and a retry time from another process's clock means nothing).
From there the lookup decides: found -> filled / rejected; not found ->
`sending()`, legal from both PENDING and RETRY; lookup failed ->
`unavailable()`. `tests/unit/core/test_exits.py` walks every state and
every lookup outcome.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from tickguard.core.backoff import Exponential
from tickguard.core.positions import ExitReason, Side
from tickguard.core.prices import PriceSource

# A failed send is retried after 0.5 s, 1 s, 2 s, ... capped here: exits are
# urgent, but a broker that is down must not be hammered.
RETRY_INITIAL_DELAY = 0.5
RETRY_MAX_DELAY = 8.0


class ExitState(enum.Enum):
    PENDING = "pending"  # decided and journalled, not yet handed to the broker
    SENT = "sent"  # handed to the broker; its answer is not known yet
    RETRY = "retry"  # the broker was unreachable or timed out: reconcile, then resend
    FILLED = "filled"  # the broker confirmed the fill: the position is closed
    REJECTED = "rejected"  # the broker refused: no order exists
    CANCELLED = "cancelled"  # not sent: the broker holds nothing to exit (docs/account.md)

    @property
    def in_flight(self) -> bool:
        return self in (ExitState.PENDING, ExitState.SENT, ExitState.RETRY)


class InvalidTransition(ValueError):
    """An exit was asked to move along an edge its state machine does not have."""

    def __init__(self, client_order_id: str, state: ExitState, event: str) -> None:
        super().__init__(client_order_id, state, event)
        self.client_order_id = client_order_id
        self.state = state
        self.event = event

    def __str__(self) -> str:
        return f"exit {self.client_order_id}: cannot {self.event} while {self.state.value}"


def retry_delay(failures: int) -> float:
    """Delay before trying again after `failures` unanswered calls in a row (capped exponential)."""
    # Built at each call: tests shorten the schedule by patching the two constants.
    return Exponential(RETRY_INITIAL_DELAY, RETRY_MAX_DELAY).delay(failures)


@dataclass(frozen=True, slots=True)
class Exit:
    """One exit order for one position, from decision to fill or refusal."""

    client_order_id: str
    position_id: int
    symbol: str
    side: Side  # the side of the position being closed
    quantity: float
    reason: ExitReason
    price_source: PriceSource
    trigger_price: float | None  # the price seen when decided (None without any)
    decided_at: float  # wall-clock epoch seconds, for the journal only
    state: ExitState = ExitState.PENDING
    attempts: int = 0  # sends so far
    failures: int = 0  # unanswered sends and lookups in a row: grows the retry delay
    retry_at: float | None = None  # monotonic; set in RETRY
    fill_price: float | None = None
    filled_quantity: float | None = None  # set when filled: all of `quantity`, or less (partly)
    broker_order_id: str | None = None
    detail: str = ""

    def _move(self, event: str, allowed: tuple[ExitState, ...], **changes: object) -> Exit:
        if self.state not in allowed:
            raise InvalidTransition(self.client_order_id, self.state, event)
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def sending(self) -> Exit:
        """Handed to the broker (first send, or a resend after reconciling)."""
        return self._move(
            "send",
            (ExitState.PENDING, ExitState.RETRY),
            state=ExitState.SENT,
            attempts=self.attempts + 1,
            retry_at=None,
        )

    def filled(self, price: float, broker_order_id: str, quantity: float | None = None) -> Exit:
        """The broker filled it (answered, or found when reconciling): all of it, or
        `quantity` of it (a partial fill; the rest of the position is exited again)."""
        done = self.quantity if quantity is None else min(max(quantity, 0.0), self.quantity)
        return self._move(
            "fill",
            (ExitState.PENDING, ExitState.SENT, ExitState.RETRY),
            state=ExitState.FILLED,
            fill_price=price,
            filled_quantity=done,
            broker_order_id=broker_order_id,
            retry_at=None,
            detail="",
        )

    def pnl(self, entry_price: float) -> float | None:
        """(fill - entry) x filled for a long exit, (entry - fill) x filled for a short."""
        if self.fill_price is None or self.filled_quantity is None:
            return None
        move = self.fill_price - entry_price
        if self.side is Side.SHORT:
            move = -move
        return round(move * self.filled_quantity, 8)

    def rejected(self, detail: str) -> Exit:
        """The broker refused it; no order exists."""
        return self._move(
            "reject",
            (ExitState.PENDING, ExitState.SENT, ExitState.RETRY),
            state=ExitState.REJECTED,
            retry_at=None,
            detail=detail,
        )

    def cancelled(self, detail: str) -> Exit:
        """Not sent after all: the account holds nothing on its side (a send that may have
        reached the broker, SENT, is never cancelled: it is looked up)."""
        return self._move(
            "cancel",
            (ExitState.PENDING, ExitState.RETRY),
            state=ExitState.CANCELLED,
            retry_at=None,
            detail=detail,
        )

    def resized(self, quantity: float) -> Exit:
        """Sized down to what the account holds, before it is sent."""
        if not 0 < quantity <= self.quantity:
            raise ValueError(
                f"exit {self.client_order_id}: cannot resize {self.quantity} to {quantity}"
            )
        return self._move("resize", (ExitState.PENDING, ExitState.RETRY), quantity=quantity)

    def unavailable(self, detail: str, now: float) -> Exit:
        """The broker could not be reached or timed out: retry later, same id."""
        return self._move(
            "retry",
            (ExitState.PENDING, ExitState.SENT, ExitState.RETRY),
            state=ExitState.RETRY,
            failures=self.failures + 1,
            retry_at=now + retry_delay(self.failures + 1),
            detail=detail,
        )

    def recovered(self) -> Exit:
        """The restart transition: resumed after a crash, to be looked up before any send."""
        if self.state is ExitState.PENDING:
            return self._move("recover", (ExitState.PENDING,))
        return self._move(
            "recover",
            (ExitState.SENT, ExitState.RETRY),
            state=ExitState.RETRY,
            retry_at=None,
            detail="resumed: looking the order up by its client order id",
        )

    def due(self, now: float) -> bool:
        """Whether a RETRY exit may be reconciled and resent at `now`."""
        return self.state is ExitState.RETRY and (self.retry_at is None or now >= self.retry_at)
