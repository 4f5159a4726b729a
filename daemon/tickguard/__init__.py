"""tickguard: guards open trading positions when the market-data feed fails."""

__version__ = "0.1.0"
