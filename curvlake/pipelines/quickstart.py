"""``curvlake quickstart``: a small end-to-end tour on the embedded digits data.

Trains a small MLP and a small CNN on scikit-learn's bundled digits (no download) into the lake,
then runs the analyses of the other pipelines on them: input-Jacobian norms, per-example Fishers
and NPEFF components, Hessian eigenpairs and their overlap with a magnitude mask, one-shot
M-FAC vs magnitude pruning, layer saturation, probes and receptive fields, and ends with the
HTML report of the lake. Every step is an ordinary pipeline call,
so rerunning the quickstart reuses what is already stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from curvlake.lake import Lake
from curvlake.pipelines.hessian.quickstart import quickstart_hessian
from curvlake.pipelines.jacobian_stats.pipeline import run_stats
from curvlake.pipelines.mfac.prune import quickstart_pruning
from curvlake.pipelines.npeff.compute_pefs import run_pefs
from curvlake.pipelines.npeff.downstream import top_examples_collage
from curvlake.pipelines.npeff.fit import run_npeff_fit
from curvlake.pipelines.saturation.quickstart import quickstart_saturation
from curvlake.pipelines.train import run_train
from curvlake.report import quickstart_report

MLP_CONFIG = {
    "model": "mlp",
    "model_params": {"widths": [64]},
    "dataset": "digits",
    "epochs": 10,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "batch_size": 64,
    "save_every": 5,
    "device": "cpu",
    "seed": 0,
}
CNN_CONFIG = {
    "model": "cnn5_k",
    "model_params": {"k": 4},
    "dataset": "digits",
    "epochs": 8,
    "optimizer": "adam",
    "lr": 0.003,
    "batch_size": 64,
    "save_every": 4,
    "device": "cpu",
    "seed": 0,
}


@dataclass
class QuickstartResult:
    """Artifact ids made by the quickstart, by role."""

    runs: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)


def run_quickstart(lake: Lake, *, echo: Callable[[str], None] = print) -> QuickstartResult:
    """Train the quickstart models and run every analysis step on them."""
    result = QuickstartResult()
    for name, config in (("mlp", MLP_CONFIG), ("cnn", CNN_CONFIG)):
        echo(f"training the quickstart {name} on digits")
        result.runs[name] = run_train(lake, config)
    echo("input-Jacobian norms of both models at every checkpoint (test split)")
    stats_id = run_stats(
        lake,
        list(result.runs.values()),
        split="test",
        metrics=["jacobian_operator", "jacobian_frobenius", "accuracy"],
    )
    result.artifacts["jacobian_stats"] = stats_id
    ds = lake.open(stats_id)
    means = ds[["jacobian_operator", "accuracy"]].mean("example").compute()
    for r, name in enumerate(result.runs):
        for c, epoch in enumerate(ds.checkpoint_epoch.values[r]):
            echo(
                f"  {name} epoch {int(epoch):>2}: mean ||J||_2 = "
                f"{float(means.jacobian_operator[r, c]):.3f}, "
                f"test accuracy {float(means.accuracy[r, c]):.3f}"
            )
    echo("per-example Fishers of the CNN (500 training examples) and their D-NPEFF components")
    pefs_id = run_pefs(lake, result.runs["cnn"], n_examples=500, k=1024, progress=False)
    npeff_id = run_npeff_fit(lake, pefs_id, n_components=8, max_iter=100, progress=False)
    result.artifacts["pefs"] = pefs_id
    result.artifacts["npeff"] = npeff_id
    loss = lake.open(npeff_id)["loss"].values
    echo(f"  relative loss {loss[0]:.3f} -> {loss[-1]:.3f} in {len(loss) - 1} iterations")
    collage = Path(lake.url).parent / "quickstart-npeff-top-examples.png"
    if not lake.local:
        collage = Path("quickstart-npeff-top-examples.png")
    top_examples_collage(lake, npeff_id, collage, components=[0, 1, 2, 3], n_top=8)
    result.figures["top examples of NPEFF components 0-3"] = str(collage)
    for step, run in (
        (quickstart_hessian, result.runs["mlp"]),
        (quickstart_pruning, result.runs["cnn"]),
        (quickstart_saturation, result.runs["cnn"]),
    ):
        _record(result, step(lake, run, echo))
    result.figures["the lake report"] = quickstart_report(lake, echo)
    return result


def _record(result: QuickstartResult, made: dict[str, str]) -> None:
    """File a step's outputs: artifact ids by role, everything else is a figure path."""
    for role, value in made.items():
        is_artifact = "-" in value and not value.endswith((".png", ".svg", ".html"))
        (result.artifacts if is_artifact else result.figures)[role] = value
