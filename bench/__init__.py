"""lowbit's microbenchmark suite: run from a checkout as ``python -m bench`` (see bench/__main__.py)."""
