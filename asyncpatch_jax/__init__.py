"""asyncpatch_jax: spatially asynchronous diffusion models in JAX/Flax.

Every pixel carries its own noise level t in [0, 1] (t = 0 clean, t = 1 noise).
See README.md and docs/conventions.md for the conventions shared by all modules.
"""

__version__ = "0.1.0"
