"""Saturation (PHD-LAB / delve): covariance spectra, PCA projections, probes, receptive fields.

Layer-1 kernels of the method family of Richter et al. (2021, 2022):

- :mod:`~curvlake.pipelines.saturation.moments`: exactly mergeable float64 moments of layer
  features (Chan et al. 1979) and the reshaping of conv outputs (``channelwise|mean|max|flatten``);
- :mod:`~curvlake.pipelines.saturation.spectrum`: eigenvalues, intrinsic dimension (textbook rule
  and delve 0.1.50's rule), saturation, trace, and the delta / random PCA projections;
- :mod:`~curvlake.pipelines.saturation.probes`: L2 logistic-regression probes whose loss and
  gradient are sums over example blocks (scikit-learn's objective, L-BFGS-B);
- :mod:`~curvlake.pipelines.saturation.receptive_field`: analytic min / max receptive fields over
  the torch.fx graph and the border layer.
"""

from curvlake.pipelines.saturation.moments import (
    CONV_METHODS,
    SEQUENCE_METHODS,
    Moments,
    conv_features,
    merge_moments,
    sequence_features,
)
from curvlake.pipelines.saturation.probes import (
    LossGrad,
    ProbeFit,
    accuracy,
    block_correct,
    block_loss_grad,
    fit_probe,
    predict,
    probe_logits,
    standardization,
)
from curvlake.pipelines.saturation.receptive_field import (
    LayerReceptiveField,
    ReceptiveFieldTable,
    UnsupportedLayerError,
    receptive_fields,
)
from curvlake.pipelines.saturation.spectrum import (
    RULES,
    SaturationStats,
    Spectrum,
    covariance_spectrum,
    cumulative_explained_variance,
    delta_projection,
    explained_variance_ratio,
    intrinsic_dimension,
    project_features,
    projection_matrix,
    random_projection_matrix,
    saturation_statistics,
)

__all__ = [
    "CONV_METHODS",
    "RULES",
    "SEQUENCE_METHODS",
    "LayerReceptiveField",
    "LossGrad",
    "Moments",
    "ProbeFit",
    "ReceptiveFieldTable",
    "SaturationStats",
    "Spectrum",
    "UnsupportedLayerError",
    "accuracy",
    "block_correct",
    "block_loss_grad",
    "conv_features",
    "covariance_spectrum",
    "cumulative_explained_variance",
    "delta_projection",
    "explained_variance_ratio",
    "fit_probe",
    "intrinsic_dimension",
    "merge_moments",
    "predict",
    "probe_logits",
    "project_features",
    "projection_matrix",
    "random_projection_matrix",
    "receptive_fields",
    "saturation_statistics",
    "sequence_features",
    "standardization",
]
