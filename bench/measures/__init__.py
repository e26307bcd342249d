"""Built-in metrics.

* :mod:`bench.measures.detection` -- detection metrics from the verifier's output: ``bit_accuracy``, ``tpr``
  (TPR at each target FPR, with the empirical FPR), ``pvalue`` (median log10 binomial p-value) and ``auc``.
* :mod:`bench.measures.quality` -- image-quality metrics: ``psnr`` and ``ssim`` (the mark's cost and the attack's
  distortion).

The submodules are imported lazily by the metric registry (``bench.registries.BUILTIN_METRICS``); the statistics
they rest on live in :mod:`bench.stats`.
"""
