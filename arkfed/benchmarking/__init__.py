"""Benchmarks that answer a user's question with numbers (``arkfed benchmark ...``).
May import evaluation, federation, run and below; only the CLI imports it."""
