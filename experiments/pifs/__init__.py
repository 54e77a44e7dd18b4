"""PIFS paper: the schedule theory (Tables 1-2) and the Section 7 protocol (README.md here)."""
