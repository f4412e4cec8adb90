"""Benchmarks that answer a user's question with numbers (``arkfed benchmark ...``)."""
