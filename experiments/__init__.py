"""Research probes: scripts that measure something about a world or a method once, for the docs (not performance
benchmarks: those are in ``benchmarks/``). Run them from the repository root, e.g. ``python -m experiments.geometry``.
"""
