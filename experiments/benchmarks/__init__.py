"""Benchmarks: cost and speed of the library's parts, measured side by side (README.md here)."""
