"""Sketched eigendecompositions of Hessians and their overlap with parameter masks.

The method of Fernandez, Schneider, Mahsereci and Hennig, "Connecting Parameter Magnitudes and
Hessian Eigenspaces at Scale using Sketched Methods" (TMLR 2025, arXiv 2504.14701; the SkEIGH
routine), with the recovery variants of Halko, Martinsson and Tropp (SIAM Review 2011) and of
Tropp, Yurtsever, Udell and Cevher (SIMAX 2017, SISC 2019).

Layer-1 kernels (pure NumPy / CuPy functions, no Dask, no lake):

* :mod:`curvlake.pipelines.hessian.test_matrices`: counter-based Gaussian and Rademacher test
  matrices generated block by block, and the SSRFT with its adjoint;
* :mod:`curvlake.pipelines.hessian.recovery`: QR and core steps of the five recovery modes
  (``hmt``, ``oversampled``, ``recycled``, ``nystrom``, ``singlepass``), their HVP and data-pass
  budgets, the a-posteriori error estimate and the scree bounds;
* :mod:`curvlake.pipelines.hessian.overlap`: the mask overlap curve, its random baseline, IoU
  and the Grassmannian metrics from principal angles, all as row-block partials plus a finalize
  step.
"""
