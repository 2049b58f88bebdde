"""Steward: train, tune, serve and watch large models responsibly, on Ray."""

__version__ = "0.1.0"
