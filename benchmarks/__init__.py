"""Benchmarks: thin scripts (``python -m benchmarks.<name>`` from the repository root, README.md beside this file) over
a shared library, :mod:`benchmarks.lib`."""
