"""asyncpatch_jax: spatially asynchronous diffusion in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    # Shape assertions at API boundaries, and readable reshapes (heads, patches).
    "chex==0.1.92",
    "einops==0.8.2",
    # Every path under a workdir or data_dir (runtime/storage.py).
    "etils[epath]>=1.7,<2",
    # The input pipeline's reader threads (data/input_pipeline.py).
    "grain==0.2.18",
    "numpy>=2.0,<3",
    "scipy>=1.13,<2",
    # Embedded offline datasets ship inside these two packages.
    "scikit-learn>=1.5,<2",
    "scikit-image>=0.24,<1",
    # PSNR/SSIM (evaluation/metrics.py); pretrained feature weights from user files
    # (evaluation/weights_file.py).
    "dm-pix==0.4.5",
    "safetensors>=0.4,<1",
    # Plots of the experiments/ scripts.
    "matplotlib>=3.8,<4",
    "pillow>=10,<14",
    "tqdm>=4.66,<5",
    "tensorboardX>=2.6,<3",
]

# gs:// workdirs and data_dirs: gcsfs is etils.epath's GCS backend; tensorboardX writes
# its gs:// event files with google-cloud-storage. (Checkpoint arrays go through
# tensorstore, a dependency of orbax, which speaks GCS by itself.)
GCS = ["gcsfs>=2024.2", "google-cloud-storage>=2.14,<4"]

EXTRAS_REQUIRE = {
    # The GCS emulator runs the gs:// workdir tests offline (tests/test_cloud_workdir.py).
    "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "gcp-storage-emulator==2026.7.19"],
    # Real datasets: read with tfds.data_source + grain (no TensorFlow at run time).
    "data": ["tensorflow-datasets==4.9.10"],
    # TPU VMs: the TPU runtime and GCS access for gs:// workdirs.
    "tpu": ["jax[tpu]==0.10.2", *GCS],
    # The PyTorch peers of experiments/benchmarks/bench_peer.py and bench_dit_peer.py (never
    # imported by the library; tests/test_dit_peer.py runs its live comparison only where
    # torch is installed; diffusers for UNet2DModel comparisons).
    "bench": ["torch>=2.4", "diffusers>=0.30"],
}
EXTRAS_REQUIRE["test"] += EXTRAS_REQUIRE["data"] + GCS

setuptools.setup(
    name="asyncpatch_jax",
    version="0.1.0",
    description="Spatially asynchronous diffusion (per-pixel noise levels) in JAX/Flax.",
    packages=setuptools.find_packages(include=["asyncpatch_jax", "asyncpatch_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
