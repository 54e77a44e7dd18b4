"""Shared infrastructure below every other wing: input checks, storage (local and gs://), device meshes, progress bars, and the processes of a multi-host run."""
