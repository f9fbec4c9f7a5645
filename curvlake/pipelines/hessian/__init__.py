"""Sketched eigendecompositions of Hessians and their overlap with parameter masks.

The method of Fernandez, Schneider, Mahsereci and Hennig, "Connecting Parameter Magnitudes and
Hessian Eigenspaces at Scale using Sketched Methods" (TMLR 2025, arXiv 2504.14701; the SkEIGH
routine), with the recovery variants of Halko, Martinsson and Tropp (SIAM Review 2011) and of
Tropp, Yurtsever, Udell and Cevher (SIMAX 2017, SISC 2019), and randomized block Krylov
(Musco and Musco, NeurIPS 2015).

Layer-1 kernels (pure NumPy / CuPy functions, no Dask, no lake):

* :mod:`curvlake.pipelines.hessian.test_matrices`: counter-based Gaussian and Rademacher test
  matrices generated block by block, and the SSRFT with its adjoint;
* :mod:`curvlake.pipelines.hessian.recovery`: QR and core steps of the six recovery modes
  (``hmt``, ``krylov``, ``oversampled``, ``recycled``, ``nystrom``, ``singlepass``), their HVP
  and data-pass budgets, the a-posteriori error estimate and the scree bounds;
* :mod:`curvlake.pipelines.hessian.overlap`: the mask overlap curve, its random baseline, IoU
  and the Grassmannian metrics from principal angles, all as row-block partials plus a finalize
  step.

The lake pipeline (layers 2 and 3, Dask over lake arrays, one artifact each):

* :mod:`curvlake.pipelines.hessian.sketch`: ``run_hessian_sketch``, the measurement rounds as
  column-block tasks of batched HVPs (one data pass each), resumable per column, with the HVP
  accounting checked (``hessian_sketch``);
* :mod:`curvlake.pipelines.hessian.solve`: ``run_hessian_solve`` (TSQR over row blocks,
  projections as row-block map-reduces, the core, the a-posteriori error and scree bounds),
  ``run_hessian_eig`` (sketch + solve, or the exact method for small nets) (``hessian_eigs``);
* :mod:`curvlake.pipelines.hessian.overlap_pipeline`: ``run_hessian_overlap``, a mask's
  overlap curve, baseline, IoU and Grassmannian metrics (``hessian_overlap``);
* :mod:`curvlake.pipelines.hessian.plot`: the spectrum with scree bounds, overlap against k'
  and over training; :mod:`curvlake.pipelines.hessian.hdf5_import`: the seed's skerch HDF5
  measurements as a ``hessian_sketch``; :mod:`curvlake.pipelines.hessian.quickstart`: the
  quickstart's Hessian step;
* :mod:`curvlake.pipelines.hessian._tall`: the shared Dask steps on tall ``(param, column)``
  matrices (row blocks, TSQR into the lake, row-block reductions, CuPy chunks on GPU workers).
"""
