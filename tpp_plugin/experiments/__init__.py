"""Benchmarks and experiments kept out of the test suite (run them as modules)."""
