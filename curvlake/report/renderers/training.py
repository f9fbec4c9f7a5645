"""Figures of the data and training kinds: ``dataset``, ``run``, ``jacobian_stats``."""

from __future__ import annotations

import numpy as np

from curvlake.constants import JACOBIAN_METRICS, SPLITS
from curvlake.errors import UserInputError
from curvlake.lake import ArtifactInfo, Lake
from curvlake.pipelines.jacobian_stats.plot import width_sweep_figure
from curvlake.report.figures import Figure, new_figure
from curvlake.report.renderers._images import is_image, mosaic
from curvlake.report.renderers._registry import caption, renderer

_N_IMAGES = 16


@renderer("dataset")
def dataset_figures(lake: Lake, info: ArtifactInfo):
    """Examples per class and split; the first images when the inputs are images."""
    group = lake.group(info.id)
    y = np.asarray(group["y"][:])
    split = np.array([str(s) for s in group["split"][:]])
    num_classes = int(group.attrs["num_classes"])
    shape = tuple(int(s) for s in group.attrs["input_shape"])
    images = is_image(shape) and len(y) > 0
    fig = new_figure(9 if images else 5, 3)
    axes = fig.subplots(1, 2 if images else 1, squeeze=False)[0]
    width = 0.8 / len(SPLITS)
    for i, name in enumerate(SPLITS):
        counts = np.bincount(y[split == name], minlength=num_classes)
        axes[0].bar(np.arange(num_classes) + (i - 1) * width, counts, width, label=name)
    axes[0].set_xlabel("class")
    axes[0].set_ylabel("examples")
    axes[0].legend()
    axes[0].set_title(f"{group.attrs['name']}: {len(y)} examples, input {list(shape)}")
    what = "Examples per class in each split"
    if images:
        x = np.asarray(group["x"][:_N_IMAGES]).reshape(-1, *shape)
        axes[1].imshow(mosaic(x, n_cols=8), cmap="gray", vmin=0, vmax=1)
        axes[1].set_axis_off()
        axes[1].set_title(f"the first {len(x)} examples")
        what += ", and the first examples"
    yield Figure(f"{info.id}-classes", caption(info, what), fig)


@renderer("run")
def training_curves(lake: Lake, info: ArtifactInfo):
    """Loss and accuracy per epoch on every split, and the learning rate."""
    group = lake.group(info.id)
    epoch = np.asarray(group["epoch"][:])
    fig = new_figure(10, 3)
    loss_ax, accuracy_ax, lr_ax = fig.subplots(1, 3)
    for split in SPLITS:
        label = f"{split} (noisy labels)" if split == "train" else split
        loss_ax.plot(epoch, group[f"{split}_loss"][:], marker=".", label=label)
        accuracy_ax.plot(epoch, group[f"{split}_accuracy"][:], marker=".", label=label)
    lr_ax.plot(epoch, group["lr"][:], marker=".")
    for epoch_c in np.asarray(group["checkpoint_epoch"][:]):
        for ax in (loss_ax, accuracy_ax):
            ax.axvline(epoch_c, color="0.8", linestyle=":", linewidth=0.8, zorder=0)
    for ax, name in ((loss_ax, "loss"), (accuracy_ax, "accuracy"), (lr_ax, "learning rate")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
    loss_ax.legend()
    attrs = group.attrs
    loss_ax.set_title(f"{attrs['model']} on {attrs['dataset']} ({attrs['optimizer']})")
    yield Figure(
        f"{info.id}-training",
        caption(
            info,
            "Training curves: loss and accuracy per epoch on each split (epoch 0: the initial "
            "model), and the learning rate; dotted lines mark the stored checkpoints",
        ),
        fig,
    )


@renderer("jacobian_stats")
def jacobian_figures(lake: Lake, info: ArtifactInfo):
    """Input-Jacobian norms and errors against width (the figure of ``curvlake stats plot``);
    each statistic's mean over checkpoints."""
    ds = lake.open(info.id)
    norms = [m for m in JACOBIAN_METRICS if m in ds]
    split = ds.attrs["split"]
    for metric in norms:
        try:
            fig = width_sweep_figure(lake, info.id, metric=metric)
        except UserInputError:  # a run without a width parameter: no sweep to draw
            break
        yield Figure(
            f"{info.id}-width-{metric}",
            caption(
                info,
                f"Mean {metric} (± std over the {split} examples, last checkpoint) and "
                "train/test error against model width",
            ),
            fig,
        )
    stats = [m for m in (*norms, "cross_entropy", "confidence", "accuracy") if m in ds]
    if ds.sizes["checkpoint"] > 1 and stats:
        means = ds[stats].mean("example").compute()
        runs = [str(r) for r in ds["run"].values]
        fig = new_figure(3.2 * len(stats), 3)
        axes = fig.subplots(1, len(stats), squeeze=False)[0]
        for ax, metric in zip(axes, stats, strict=True):
            for r, run in enumerate(runs):
                ax.plot(
                    ds["checkpoint_epoch"].values[r],
                    means[metric].values[r],
                    marker=".",
                    label=run,
                )
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"mean {metric}")
        axes[0].legend()
        yield Figure(
            f"{info.id}-epochs",
            caption(info, f"Each statistic's mean over the {split} examples at every checkpoint"),
            fig,
        )
