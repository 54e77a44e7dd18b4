"""Where the library runs: processes and the arrays that span them (below every other wing)."""
