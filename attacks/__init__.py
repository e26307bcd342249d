"""Built-in attacks: image-space attacks (:mod:`attacks.image`) and model-level attacks (:mod:`attacks.model`).

Plugin modules are registered lazily from ``bench.registries``; nothing is imported here.
"""
