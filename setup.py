"""asyncpatch_jax: spatially asynchronous diffusion in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "einops==0.8.2",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy>=2.0,<3",
    "scipy>=1.13,<2",
    # Embedded offline datasets ship inside these two packages.
    "scikit-learn>=1.5,<2",
    "scikit-image>=0.24,<1",
    "dm-pix==0.4.5",
    "matplotlib>=3.8,<4",
    "pillow>=10,<14",
    "tqdm>=4.66,<5",
    "tensorboardX>=2.6,<3",
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"],
    # Real datasets: read with tfds.data_source + grain (no TensorFlow at run time).
    "data": ["tensorflow-datasets==4.9.10", "grain==0.2.18"],
    # TPU runtime; install on TPU VMs only.
    "tpu": ["jax[tpu]==0.10.2"],
}
EXTRAS_REQUIRE["test"] += EXTRAS_REQUIRE["data"]

setuptools.setup(
    name="asyncpatch_jax",
    version="0.1.0",
    description="Spatially asynchronous diffusion (per-pixel noise levels) in JAX/Flax.",
    packages=setuptools.find_packages(include=["asyncpatch_jax", "asyncpatch_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
