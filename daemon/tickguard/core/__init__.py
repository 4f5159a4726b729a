"""The pure core: prices, positions, exits, backoff and market hours.

Standard library only, no I/O, no clocks, no randomness of its own: callers
pass events plus `now` (monotonic seconds) and get decisions back.

Money is `float` everywhere. Feeds and brokers deliver IEEE doubles, the
thresholds are compared against those same doubles, and nothing here sums
long series of amounts; Decimal would only add conversions at every edge.
pnl is rounded to 1e-8 where it is reported.
"""
