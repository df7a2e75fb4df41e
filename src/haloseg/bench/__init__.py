"""Benchmark scenarios: programs that print tables and write JSON (never timed in CI)."""
