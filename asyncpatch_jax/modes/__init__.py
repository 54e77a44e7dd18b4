"""The command line's modes: train, sample (every task) and evaluate a workdir."""
