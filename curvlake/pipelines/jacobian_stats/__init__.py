"""Per-example dataset statistics of a trained classifier: accuracy, loss, confidence and
input-Jacobian norms (Frobenius and operator norm).

The kernels live in :mod:`curvlake.pipelines.jacobian_stats.metrics` (pure torch, one value per
example). They follow Gamba, Azizpour and Björkman, *On the Lipschitz Constant of Deep Networks
and Double Descent*, BMVC 2023 (arXiv:2301.12309), but compute the operator norm exactly from the
K x K Gram matrix of the per-example Jacobian (or with a convergence-checked Lanczos iteration)
instead of the reference code's power iteration, which returned 0 or wrong values.
"""
