"""Metrics: pure functions over predictions and references (library implementations)."""
