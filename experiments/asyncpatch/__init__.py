"""AsyncPatch paper: Tables 1, 3-4, Figs. 3, 5-7, Sec. 5.2 (README.md here)."""
