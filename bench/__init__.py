"""`python -m bench`: kernel and model benchmarks (see bench/__main__.py)."""
