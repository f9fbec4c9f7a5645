"""Cross-method analyses: questions that join artifacts of different methods of one lake.

Each entry point checks that its inputs describe the same thing (run, checkpoint, parameter
space, examples; :mod:`~curvlake.pipelines.compare._inputs`), then writes one artifact whose
figure :data:`curvlake.report.RENDERERS` draws:

- :func:`run_masks_eigenspace` (``comparison_masks``): overlap of masks (pruning, magnitude,
  NPEFF top parameters) with a Hessian top-k eigenspace, against the random baseline;
- :func:`run_drift` (``comparison_drift``): principal angles between eigenspaces of
  checkpoints (or runs), over training;
- :func:`run_examples` (``comparison_examples``): NPEFF coefficients against per-example
  loss, confidence, PEF norm and input-Jacobian norms (rank correlations, top examples);
- :func:`run_layers` (``comparison_layers``): saturation, probe accuracy and receptive field
  per layer, with the border layer, over epochs.
"""

from curvlake.pipelines.compare.drift import run_drift, run_eigs_of
from curvlake.pipelines.compare.examples import run_examples
from curvlake.pipelines.compare.layers import run_layers
from curvlake.pipelines.compare.masks import npeff_top_parameters, run_masks_eigenspace

__all__ = [
    "npeff_top_parameters",
    "run_drift",
    "run_eigs_of",
    "run_examples",
    "run_layers",
    "run_masks_eigenspace",
]
