"""The exception hierarchy, grouped by what the caller must do.

- ConfigError: a person must fix the configuration (exit code 2).
- FeedError: the feed misbehaved; the supervisor reconnects.
- BrokerRejected: the broker refused an order; do not retry it blindly.
- BrokerUnavailable: the broker could not be reached or timed out; the order
  may or may not exist, so retry idempotently (same client order id, after
  reconciling). BrokerBusy, its subclass: the broker refused for now (rate
  limited) a call that changes nothing when refused (the safety net's stops).
- StoreError: the state directory is unusable; the daemon cannot guard safely.
  PositionExists, its one subclass, is no failure of the store: the symbol
  already has an active position (the caller asked for a duplicate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tickguard.core.untrusted import shown


class TickguardError(Exception):
    """Root of every error tickguard raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a configuration: where, what, and what was expected."""

    key: str
    value: object
    expected: str

    def __str__(self) -> str:
        return f"{self.key}: {shown(self.value)} is invalid; expected {self.expected}"


class ConfigError(TickguardError):
    """The configuration is invalid; carries every problem found."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        super().__init__(problems)
        self.problems = tuple(problems)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class FeedError(TickguardError):
    """The market-data feed failed in a way the supervisor recovers from."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


class BrokerError(TickguardError):
    """Base of broker failures."""

    def __init__(self, client_order_id: str, detail: str) -> None:
        super().__init__(client_order_id, detail)
        self.client_order_id = client_order_id
        self.detail = detail

    def __str__(self) -> str:
        return f"order {self.client_order_id}: {self.detail}"


class BrokerRejected(BrokerError):
    """The broker refused the order: it does not exist; retrying as-is is pointless."""


class BrokerUnavailable(BrokerError):
    """The broker was unreachable or timed out: the order may exist. Reconcile, then retry."""


class BrokerBusy(BrokerUnavailable):
    """The broker answered, but refused for now (too many requests): nothing was done; the
    same call may go again shortly."""


class StoreError(TickguardError):
    """The state store is unusable (corrupt, newer schema, unwritable)."""


class PositionExists(StoreError):
    """The symbol already has an open or exiting position: the store works, the request conflicts."""

    def __init__(self, symbol: str) -> None:
        super().__init__(symbol)
        self.symbol = symbol

    def __str__(self) -> str:
        return f"{self.symbol} already has an active position"
