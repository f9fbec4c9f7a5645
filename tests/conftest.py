"""Test-session settings."""

import os

# One intra-op thread per process, set before numpy / torch load their BLAS: the suite starts
# Dask workers and subprocesses beside pytest, and oversubscribed BLAS threads make small models
# orders of magnitude slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
