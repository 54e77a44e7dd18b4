"""IPR paper: refinement of the digits model and the constraint benchmarks (README.md here)."""
