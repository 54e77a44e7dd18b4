"""Shared pytest setup: CPU only, float32 default, deterministic."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
