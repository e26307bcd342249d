"""Model-level attack plugins: a pipeline in, a pipeline out."""
