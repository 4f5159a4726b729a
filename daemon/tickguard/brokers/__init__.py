"""Broker adapters: the paper broker (embedded default) and real brokers."""
