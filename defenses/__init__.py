"""Defence plugins (watermarking methods). Each module is one self-contained method, registered lazily by the
table in :mod:`bench.registries`."""
