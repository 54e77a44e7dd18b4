"""Scripts that reproduce the papers' tables and figures, and the benchmarks (README.md here)."""
