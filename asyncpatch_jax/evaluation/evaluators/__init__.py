"""The evaluators: one interface (base.py), one module per evaluator, chosen by the config."""
