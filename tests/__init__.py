"""MarkBench test suite."""
