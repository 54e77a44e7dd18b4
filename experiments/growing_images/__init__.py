"""Growing Images paper: the Blume-Capel lab and the spatial-schedule study (README.md here)."""
