"""lm-eval scores through every implementation the harness drives."""
