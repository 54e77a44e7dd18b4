"""Generation: one sampling pipeline for pixel and latent models, and the writing of its outputs."""
