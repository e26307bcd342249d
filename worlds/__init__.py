"""The built-in worlds (providers of base models, prompt sets, datasets and quality references; see
:mod:`bench.world`): ``tiny`` (the shipped tiny world, :mod:`worlds.tiny`), ``micro`` (random-weight plumbing
pipelines, :mod:`worlds.micro`) and ``sd`` (Stable Diffusion from a folder or a hub id, :mod:`worlds.sd`).

The core (``bench``) never imports this package by name: it finds worlds through the ``worlds`` registry."""
