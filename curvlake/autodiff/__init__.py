"""The shared derivatives layer: per-example gradients and curvature-vector products.

* :func:`per_example_grads`: ``G[i, k] = J_iᵀ v_ik`` for any cotangents ``v`` at the model
  output (PEF rows, per-example loss gradients), or their sums of squares;
  :func:`per_example_loss_grads` is the per-example loss gradient.
* :class:`CurvatureOperator`: Hessian- and GGN-vector products of the mean loss over a fixed
  data subset, many vectors per data pass, as a torch/numpy operator or a scipy
  ``LinearOperator``.

All of them work on θ of :mod:`curvlake.nn.params` (every tensor of
``model.named_parameters()``, frozen ones included), in eval mode, on copies of the model's
tensors: the model is never modified.
"""

from curvlake.autodiff.curvature import CurvatureKind, CurvatureOperator
from curvlake.autodiff.per_example import (
    Backend,
    CotangentFn,
    per_example_grads,
    per_example_loss_grads,
    predict_logits,
)

__all__ = [
    "Backend",
    "CotangentFn",
    "CurvatureKind",
    "CurvatureOperator",
    "per_example_grads",
    "per_example_loss_grads",
    "predict_logits",
]
