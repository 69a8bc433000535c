"""Fixtures, benchmarks and the training of edge-vlm: run from the repository root as modules,
``python -m scripts.NAME --help``. Not part of the installed package (the wheel holds edge_runtime/ only)."""
