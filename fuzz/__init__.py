"""Long-running fuzz campaigns built on dsopt.testing.strategies (run: python -m fuzz ...)."""
