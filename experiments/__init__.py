"""Scripts that reproduce the papers' tables and figures, and the benchmarks (see README.md here)."""
