"""Values from outside, judged totally: feed frames, poll answers, broker replies,
API bodies, configuration and state files.

Every number that crosses a trust boundary goes through `number` (and
`amount` or `epoch_ms` on top of it). They take any value a JSON or TOML
parser can give, of any size, and answer None rather than raise: a 400-digit
integer is not a float (`float()` would raise OverflowError), a bool is not a
number, NaN and infinities are not finite. `shown` renders any value for a
message or a log line in bounded space, and `parse_json` turns parser
failures of every kind (bad syntax, too deep, too many digits) into one
ValueError.
"""

from __future__ import annotations

import json
import math

# Quantities and prices at or above this are typing errors or hostile, and
# their products (pnl) would overflow a double into infinity, which JSON
# cannot carry. No instrument trades anywhere near it.
MAX_AMOUNT = 1e12
# Exchange timestamps are epoch milliseconds; beyond 2**53 a double cannot
# hold them exactly (and the year would be past 287,000).
MAX_EPOCH_MS = 2**53
SHOWN_LIMIT = 80  # characters of a value quoted in a message


def number(value: object) -> float | None:
    """A JSON/TOML number (int or float, never bool) as a finite float, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        result = float(value)
    except OverflowError:  # an int beyond the double range
        return None
    return result if math.isfinite(result) else None


def amount(value: object) -> float | None:
    """A price, quantity or distance: a number with 0 < x < MAX_AMOUNT, else None."""
    result = number(value)
    return result if result is not None and 0 < result < MAX_AMOUNT else None


def epoch_ms(value: object) -> tuple[bool, int | None]:
    """(ok, ms) for an optional exchange timestamp: absent (None) is fine, garbage is not."""
    if value is None:
        return True, None
    result = number(value)
    if result is None or not 0 <= result < MAX_EPOCH_MS:
        return False, None
    return True, int(result)


def parse_json(raw: str | bytes) -> object:
    """Any JSON document, or ValueError (bad syntax or encoding, nesting too deep, huge ints)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    # JSONDecodeError, UnicodeDecodeError and the int-digits limit are ValueErrors already.


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """repr(value) for a message, cut to `limit` characters (a value from outside is any size)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int over the digits limit; a nested monster
        text = f"<{type(value).__name__}>"
    if isinstance(value, int) and not isinstance(value, bool) and len(text) > limit:
        return f"<an integer of {len(text.lstrip('-'))} digits>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
