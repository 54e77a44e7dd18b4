"""Trained runs on disk: checkpoints, their integrity and compatibility, the run lock, and loading a trained run for sampling and analysis."""
