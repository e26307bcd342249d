"""Built-in image-space attacks, one module per attack family.

The registry (``bench.image_attacks``) imports a module only when its attack is first requested; this package
deliberately imports none of them.
"""
