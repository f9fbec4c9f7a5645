"""Which command makes an artifact, and which commands resume or clean one that is not complete.

The report names them in figure captions and beside incomplete artifacts. Artifacts store
their config, not their command line, so the command is known by kind (and, where one kind has
several makers, by the config entry that only one of them writes).
"""

from __future__ import annotations

from curvlake.lake import ArtifactInfo

#: The command that makes each kind.
COMMANDS = {
    "dataset": "curvlake data import",
    "run": "curvlake train",
    "pefs": "curvlake pefs compute",
    "dsf": "curvlake pefs dsf",
    "npeff": "curvlake npeff fit",
    "npeff_perturbation": "curvlake npeff perturb",
    "jacobian_stats": "curvlake stats compute",
    "mask": "curvlake mask magnitude",
    "grad_window": "curvlake mfac grads",
    "pruning": "curvlake prune oneshot",
    "hessian_sketch": "curvlake hessian sketch",
    "hessian_eigs": "curvlake hessian eig",
    "hessian_overlap": "curvlake hessian overlap",
    "saturation": "curvlake saturation compute",
    "saturation_projection": "curvlake saturation project",
    "latents": "curvlake latents extract",
    "probes": "curvlake probes fit",
    "receptive_field": "curvlake receptive-field",
    "comparison_masks": "curvlake compare masks-eigenspace",
    "comparison_drift": "curvlake compare drift",
    "comparison_examples": "curvlake compare examples",
    "comparison_layers": "curvlake compare layers",
}

#: Kinds with several makers: ``(config entry, its value or None for any, command)``, the
#: first match wins (a config entry only that maker writes).
VARIANTS = {
    "run": (("imported_from", None, "curvlake runs import"),),
    "pefs": (
        ("imported_from", None, "curvlake pefs import-hdf5"),
        ("incorrect_only", None, "curvlake pefs filter"),
    ),
    "npeff": (
        ("imported_from", None, "curvlake npeff import-hdf5"),
        ("sparsify_threshold", None, "curvlake npeff sparsify"),
        ("coefficients_of", None, "curvlake npeff coeffs"),
    ),
    "mask": (
        ("file_sha256", None, "curvlake mask import"),
        ("source", "prune", "curvlake prune oneshot|gradual"),
        ("source", "prune-selection", "curvlake prune oneshot|gradual"),
    ),
    "pruning": (("mode", "gradual", "curvlake prune gradual"),),
    "hessian_eigs": (("rcond", None, "curvlake hessian solve"),),
    "saturation": (
        ("source", "training", "curvlake train --track saturation"),
        ("source", "phdlab", "curvlake saturation import"),
    ),
    "latents": (("source", "phdlab", "curvlake saturation import"),),
    "probes": (("source", "phdlab", "curvlake saturation import"),),
}


def made_by(info: ArtifactInfo) -> str:
    """The command that made the artifact (for a kind this curvlake does not know: a phrase)."""
    for key, value, command in VARIANTS.get(info.kind, ()):
        if key in info.config and value in (None, info.config[key]):
            return command
    if info.kind == "mask" and info.config.get("source") not in (None, "magnitude"):
        return f"the {info.config['source']} pipeline"
    return COMMANDS.get(info.kind, f"the command that writes {info.kind} artifacts")


def remedy(info: ArtifactInfo) -> str:
    """What to do with an artifact that is not complete: resume it, or remove it."""
    return (
        f"resume: rerun the command that made it (`{made_by(info)}`, with the same options and "
        f"inputs); or clean: `curvlake lake rm {info.id}` (this one) or `curvlake lake gc` "
        "(every stale staged artifact)"
    )
