"""Test-session settings."""

import os

import torch

# One intra-op thread per process: the suite starts Dask workers and subprocesses beside
# pytest, and oversubscribed BLAS threads make small models orders of magnitude slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
