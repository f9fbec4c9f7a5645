"""NPEFF: non-negative per-example Fisher factorization (Matena & Raffel, arXiv 2310.04649).

Layer-1 kernels on tensors include :mod:`curvlake.pipelines.npeff.pefs` (per-example Fishers,
their sparsification, the dataset-level diagonal Fisher and example filters).
"""
