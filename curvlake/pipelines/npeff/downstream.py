"""What NPEFF components mean: their top examples and perturbation tests.

Following Matena & Raffel, "NPEFF: Non-Negative Per-Example Fisher Factorization"
(arXiv 2310.04649), Sec. 4:

- **Top examples** of component j are the examples with the largest coefficients W[:, j]
  (:func:`top_examples`); they are drawn as an image collage (:func:`top_examples_collage`) or,
  for non-image data, listed (:func:`top_examples_table`).
- **Perturbation test** (:func:`run_perturbation`): the component's parameter direction d_j
  (its row of H, or of G for LRM-NPEFF, scattered to the flat parameter vector through
  ``kept_columns``, zero elsewhere, unit L2 norm) should change the predictions on the
  component's top examples much more than on other examples. With θ the checkpoint's
  parameters and θ' = θ ± ε d_j::

      KL_S = mean_{x in S} KL(p_θ(·|x) || p_θ'(·|x)),   ratio = KL_top / KL_baseline

  with ``S`` the top examples or a random baseline set that excludes them (unlike the seed,
  whose baseline is the first examples and may overlap the top set). The forward passes use
  ``torch.func.functional_call``, so the model's own parameters are never modified.
- **Isolated directions** (``max_abs_cos``): components overlap, so moving along d_j also moves
  along its neighbours. With ``max_abs_cos = τ`` the direction is the part of h_j orthogonal to
  the span of every other component i with |cos(h_i, h_j)| <= τ (components more similar than τ
  are left in: removing them would remove most of h_j), renormalized
  (:func:`isolation_coefficients`). The seed's ``--max_abs_cos_sim`` subtracts the projections
  on those components one after another, which is not the orthogonal projection unless they
  are mutually orthogonal; here it is exact.

Layers: kernels (:func:`component_direction`, :func:`kl_divergence`, :func:`model_logits`,
:func:`perturbation_kl`) on arrays and torch modules; one Dask task per component that writes
row ``j`` of every output array and marks its progress block; the entry point
:func:`run_perturbation` writes one ``npeff_perturbation`` artifact.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import zarr

from curvlake.engine import run_tasks, torch_device
from curvlake.errors import LakeError, UserInputError
from curvlake.lake import Lake, open_lake
from curvlake.lake.checkpoints import cached_model
from curvlake.nn.datasets import Split
from curvlake.nn.params import flat_tensor, unflatten
from curvlake.pipelines.npeff.coeffs import gram
from curvlake.pipelines.npeff.fit import components_matrix
from curvlake.pipelines.skeleton import output_path, require_artifact, resolve_run
from curvlake.pipelines.train import cached_run_splits

SIGNS = (1, -1)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
FORMATS = ("dense", "csr", "lowrank")
DEFAULT_N_BASELINE = 128
#: Figure formats of the top-examples collage.
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


# -- kernels -------------------------------------------------------------------------------------


def component_direction(
    values: np.ndarray,
    kept_columns: np.ndarray,
    n_parameters: int,
    columns: np.ndarray | None = None,
) -> np.ndarray:
    """The unit parameter direction of one component: d = scatter(h_j) / ||h_j||_2.

    Args:
        values: the component's entries: a full row of H (or G) over the kept columns, or the
            stored entries of a sparse row (with ``columns``).
        kept_columns: flat parameter index of each column of H.
        n_parameters: P, the size of the flat parameter vector.
        columns: for a sparse row, the column (into ``kept_columns``) of each value.

    Returns:
        d (P,) in float64 with ``d[kept_columns[c]] = h_j[c]`` and zeros elsewhere, scaled to
        unit L2 norm (all zeros if the row is zero).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    kept = np.asarray(kept_columns, dtype=np.int64)
    target = kept if columns is None else kept[np.asarray(columns, dtype=np.int64)]
    if target.shape != values.shape:
        raise ValueError(f"{values.size} values for {target.size} columns")
    d = np.zeros(int(n_parameters), dtype=np.float64)
    d[target] = values
    norm = np.linalg.norm(d)
    return d / norm if norm > 0 else d


def component_gram(lake: Lake, npeff_id: str) -> np.ndarray:
    """``G[i, j] = <h_i, h_j>`` over all rows of H (G for LRM-NPEFF), float64.

    Streamed over H's column chunks (memory: r x chunk); a sparse H is multiplied as CSR.
    """
    return gram(components_matrix(lake, npeff_id))


def isolation_coefficients(gram: np.ndarray, j: int, max_abs_cos: float) -> np.ndarray:
    """Coefficients ``c`` with ``sum_i c_i h_i = h_j - P_S h_j``, the part of h_j orthogonal to S.

    ``S = {i != j : |G_ij| <= max_abs_cos * sqrt(G_ii G_jj)}`` (zero rows count as orthogonal)
    and ``P_S`` the orthogonal projection onto ``span{h_i : i in S}``: ``c_j = 1``,
    ``c_S = -x`` with ``x`` the minimum-norm least-squares solution of ``G_SS x = G_Sj`` (the
    normal equations of ``min_x ||h_j - sum_S x_i h_i||``), zero elsewhere. The residual's
    squared norm is ``c^T G c``.

    Args:
        gram: ``(r, r)`` Gram matrix of the rows (:func:`component_gram`).
        j: the component.
        max_abs_cos: τ in [0, 1].

    Returns:
        ``c`` (r,) float64.
    """
    gram = np.asarray(gram, dtype=np.float64)
    diag = np.clip(np.diag(gram), 0, None)
    c = np.zeros(gram.shape[0])
    c[j] = 1.0
    if diag[j] == 0:
        return c
    others = np.arange(gram.shape[0]) != j
    similar = np.abs(gram[:, j]) > max_abs_cos * np.sqrt(diag * diag[j])
    S = np.flatnonzero(others & ~similar)
    if S.size:
        x = np.linalg.lstsq(gram[np.ix_(S, S)], gram[S, j], rcond=None)[0]
        c[S] = -x
    return c


def kl_divergence(logits_p: torch.Tensor | np.ndarray, logits_q: torch.Tensor | np.ndarray):
    """Per-row KL(p || q) of p = softmax(logits_p), q = softmax(logits_q), in float64.

    KL(p || q) = sum_c p_c (log p_c - log q_c), with 0 log 0 = 0; rounding below 0 is clipped
    (the divergence is non-negative).

    Returns:
        A float64 numpy array with one value per row.
    """
    log_p = torch.log_softmax(torch.as_tensor(logits_p).to("cpu", torch.float64), dim=-1)
    log_q = torch.log_softmax(torch.as_tensor(logits_q).to("cpu", torch.float64), dim=-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1).clamp_min(0).numpy()


def model_logits(
    model: torch.nn.Module,
    x: torch.Tensor | np.ndarray,
    theta: torch.Tensor | None = None,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """Logits of ``model`` on ``x`` with its parameters replaced by the flat vector ``theta``.

    The replacement is functional (``torch.func.functional_call``): the module's parameters are
    not modified, even if the forward pass raises. Inputs are cast to the parameters' dtype and
    device; batches of ``batch_size`` examples.
    """
    first = next(model.parameters())
    if theta is None:
        theta = flat_tensor(model)
    params = unflatten(model, torch.as_tensor(theta).to(first.device, first.dtype))
    x = torch.as_tensor(x).to(first.device, first.dtype)
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size]
            out.append(torch.func.functional_call(model, params, (batch,)))
    return torch.cat(out) if out else torch.zeros(0)


class PerturbationKL(NamedTuple):
    """Result of :func:`perturbation_kl`."""

    kl: np.ndarray  # (signs, n) float64: KL(p_θ || p_θ+sεd) per example
    logits: np.ndarray  # (n, C) logits at θ
    perturbed_logits: np.ndarray  # (signs, n, C) logits at θ + s ε d


def perturbation_kl(
    model: torch.nn.Module,
    x: torch.Tensor | np.ndarray,
    direction: np.ndarray | torch.Tensor,
    epsilon: float,
    *,
    signs: Sequence[int] = SIGNS,
    batch_size: int = 256,
) -> PerturbationKL:
    """Per-example KL(p_θ || p_θ') for θ' = θ + s ε d, for each sign s.

    θ is the model's current flat parameter vector (``model.parameters()`` order, as
    ``flatten_parameters``); the computation is done in the parameters' dtype (move the model
    to float64 for exact small-ε checks). The model is left unchanged.

    Args:
        model: a classifier in eval mode.
        x: inputs (n, ...).
        direction: d (P,), typically of unit norm (:func:`component_direction`).
        epsilon: ε, the L2 length of the move when ||d|| = 1.
        signs: the signs s of the moves.
        batch_size: examples per forward pass.
    """
    first = next(model.parameters())
    theta = flat_tensor(model)
    d = torch.as_tensor(direction).to(first.device, theta.dtype)
    if d.shape != theta.shape:
        raise ValueError(f"direction has shape {tuple(d.shape)}, theta {tuple(theta.shape)}")
    original = model_logits(model, x, theta, batch_size=batch_size)
    perturbed = torch.stack(
        [
            model_logits(model, x, theta + (float(s) * float(epsilon)) * d, batch_size=batch_size)
            for s in signs
        ]
    )
    kl = np.stack([kl_divergence(original, logits) for logits in perturbed])
    return PerturbationKL(
        kl, original.cpu().to(torch.float64).numpy(), perturbed.cpu().to(torch.float64).numpy()
    )


def _top_positions(w: np.ndarray, n_top: int) -> np.ndarray:
    """Positions of the ``n_top`` largest entries of ``w``, ties broken by smaller index."""
    return np.argsort(-np.asarray(w, dtype=np.float64), kind="stable")[:n_top].astype(np.int64)


def _baseline_positions(n: int, top: np.ndarray, n_baseline: int, seed: int, component: int):
    """``n_baseline`` examples not in ``top``, drawn from ``rng([seed, component])``, sorted."""
    pool = np.setdiff1d(np.arange(n, dtype=np.int64), top)
    rng = np.random.default_rng([seed, component])
    return np.sort(rng.choice(pool, size=n_baseline, replace=False)).astype(np.int64)


# -- reading npeff artifacts ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """Where the examples and the model of an npeff artifact come from."""

    npeff: str
    pefs: str
    run: str
    checkpoint: int
    split: str


def _lake(lake: Lake | str) -> Lake:
    return open_lake(lake) if isinstance(lake, str) else lake


def _npeff_group(lake: Lake, npeff_id: str) -> zarr.Group:
    require_artifact(lake, npeff_id, "npeff", role="NPEFF artifact")
    return lake.group(npeff_id)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _components(group: zarr.Group, components: Sequence[int] | None, npeff_id: str) -> list[int]:
    r = int(group["W"].shape[1])
    if components is None:
        return list(range(r))
    if isinstance(components, (int, np.integer)):
        components = [components]
    components = list(components)
    if not components:
        raise UserInputError("components is empty; give component indices or None for all")
    bad = [c for c in components if not _is_int(c) or not 0 <= int(c) < r]
    if bad:
        raise UserInputError(
            f"component(s) {bad} out of range: {npeff_id} has components 0..{r - 1}"
        )
    components = [int(c) for c in components]
    if len(set(components)) != len(components):
        raise UserInputError(f"components {components} has duplicates")
    return components


def _check_n_top(n_top, n: int) -> int:
    if not _is_int(n_top) or n_top < 1:
        raise UserInputError(f"n_top must be an integer >= 1, got {n_top!r}")
    return min(int(n_top), n)


def _w_columns(group: zarr.Group, components: list[int]) -> np.ndarray:
    W = group["W"].get_orthogonal_selection((slice(None), components))
    return np.asarray(W, dtype=np.float64)


def _source(lake: Lake, group: zarr.Group, npeff_id: str) -> _Source:
    pefs_id = group.attrs.get("pefs")
    if not pefs_id:
        raise UserInputError(
            f"{npeff_id} names no pefs artifact (imported without --pefs?), so its examples' "
            "inputs and model are unknown"
        )
    pefs_attrs = lake.group(pefs_id).attrs
    run_id = pefs_attrs.get("run")
    if not run_id:
        origin = pefs_attrs.get("imported_from", "elsewhere")
        raise UserInputError(
            f"the PEFs {pefs_id} of {npeff_id} were imported from {origin} without their run; "
            "the inputs and model are not in the lake"
        )
    resolve_run(lake, run_id)  # complete, a run, with its data
    return _Source(
        npeff_id, pefs_id, run_id, int(pefs_attrs["checkpoint"]), str(pefs_attrs["split"])
    )


def _split_rows(split: Split, sample_ids: np.ndarray, source: _Source) -> np.ndarray:
    """Position in the split of each example, found by its sample id."""
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    order = np.argsort(split.sample_id, kind="stable")
    ordered = split.sample_id[order]
    pos = np.clip(np.searchsorted(ordered, sample_ids), 0, max(0, len(ordered) - 1))
    found = ordered[pos] == sample_ids if len(ordered) else np.zeros(len(sample_ids), bool)
    if not found.all():
        missing = sample_ids[~found][:5].tolist()
        raise LakeError(
            f"sample ids {missing} of {source.pefs} are not in the {source.split} split of "
            f"{source.run}"
        )
    return order[pos]


def _input_shape(lake: Lake, run_id: str) -> tuple[int, ...]:
    return tuple(int(s) for s in lake.group(run_id).attrs["input_shape"])


def _is_image(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[1] > 1 and shape[2] > 1


# -- top examples --------------------------------------------------------------------------------


def top_examples(
    lake: Lake | str,
    npeff_id: str,
    *,
    components: Sequence[int] | None = None,
    n_top: int = 16,
) -> dict[int, np.ndarray]:
    """The top examples of each component: positions of the largest W[:, j], descending.

    Ties are broken by the smaller example position. ``n_top`` larger than the number of
    examples gives every example.

    Args:
        lake: the lake (or its URL).
        npeff_id: an ``npeff`` artifact.
        components: component indices (default: all).
        n_top: examples per component.

    Returns:
        ``{component: int64 array of example positions (rows of W)}``, in the given order.

    Raises:
        UserInputError: not an npeff artifact, a component out of range, n_top < 1.
    """
    lake = _lake(lake)
    group = _npeff_group(lake, npeff_id)
    components = _components(group, components, npeff_id)
    n_top = _check_n_top(n_top, int(group["W"].shape[0]))
    W = _w_columns(group, components)
    return {j: _top_positions(W[:, i], n_top) for i, j in enumerate(components)}


class TopExample(NamedTuple):
    """One row of :func:`top_examples_table`."""

    component: int
    rank: int
    example: int  # position in the npeff artifact (row of W)
    sample_id: int  # index of the example in its split
    label: int
    w: float


def top_examples_table(
    lake: Lake | str,
    npeff_id: str,
    *,
    components: Sequence[int] | None = None,
    n_top: int = 16,
) -> list[TopExample]:
    """Top examples of each component as rows (component, rank, example, sample_id, label, W).

    For any data; the way to look at top examples of non-image inputs.
    """
    lake = _lake(lake)
    top = top_examples(lake, npeff_id, components=components, n_top=n_top)
    group = lake.group(npeff_id)
    sample_id = np.asarray(group["sample_id"][:], dtype=np.int64)
    label = np.asarray(group["label"][:], dtype=np.int64)
    W = _w_columns(group, list(top))
    rows = []
    for i, (j, positions) in enumerate(top.items()):
        for rank, p in enumerate(positions):
            rows.append(
                TopExample(j, rank, int(p), int(sample_id[p]), int(label[p]), float(W[p, i]))
            )
    return rows


def _raw_images(lake: Lake, source: _Source, sample_ids: np.ndarray) -> np.ndarray:
    """Raw inputs (x * std + mean per channel) of the examples, (m, C, H, W)."""
    split = cached_run_splits(lake.url, source.run).split(source.split)
    x = np.asarray(split.x[_split_rows(split, sample_ids, source)], dtype=np.float64)
    attrs = lake.group(source.run).attrs
    channels = x.shape[1]
    mean = np.broadcast_to(np.asarray(attrs.get("standardize_mean", [0.0]), np.float64), channels)
    std = np.broadcast_to(np.asarray(attrs.get("standardize_std", [1.0]), np.float64), channels)
    return x * std[None, :, None, None] + mean[None, :, None, None]


def top_examples_collage(
    lake: Lake | str,
    npeff_id: str,
    path: str | Path,
    *,
    components: Sequence[int] | None = None,
    n_top: int = 8,
    dpi: int = 100,
) -> Path:
    """One PNG with a row per component showing its top examples' input images.

    Images are the raw inputs (the run's standardization undone) of the split the PEFs were
    computed on: grayscale for one channel, RGB for three, the channel mean otherwise. Pixels in
    [0, 1] are drawn as they are; otherwise the collage is min-max scaled as a whole. The first
    image of a row names the component; each image shows its W value and label.

    Raises:
        UserInputError: bad arguments, a path whose folder does not exist or that does not
            end in a figure suffix (checked first), PEFs without a run in the lake, or
            non-image inputs (use :func:`top_examples_table` for those).
    """
    lake = _lake(lake)
    group = _npeff_group(lake, npeff_id)
    path = output_path(path, FIGURE_SUFFIXES)
    components = _components(group, components, npeff_id)
    source = _source(lake, group, npeff_id)
    shape = _input_shape(lake, source.run)
    if not _is_image(shape):
        raise UserInputError(
            f"the inputs of {source.run} have shape {list(shape)}, not images (C, H, W with "
            "H, W > 1); list the top examples with top_examples_table (`curvlake npeff top` "
            "without --out)"
        )
    from matplotlib.figure import Figure  # no pyplot: no GUI backend needed

    top = top_examples(lake, npeff_id, components=components, n_top=n_top)
    n_top = len(next(iter(top.values())))
    positions = np.concatenate(list(top.values()))
    sample_id = np.asarray(group["sample_id"][:], dtype=np.int64)
    label = np.asarray(group["label"][:], dtype=np.int64)
    images = _raw_images(lake, source, sample_id[positions])
    low, high = float(images.min()), float(images.max())
    if low < -1e-6 or high > 1 + 1e-6:
        images = (images - low) / (high - low) if high > low else np.zeros_like(images)
    images = np.clip(images, 0, 1)
    W = _w_columns(group, components)

    fig = Figure(figsize=(1.2 * n_top + 0.6, 1.35 * len(components)), layout="constrained")
    axes = fig.subplots(len(components), n_top, squeeze=False)
    for i, (j, rows) in enumerate(top.items()):
        for rank in range(n_top):
            ax = axes[i, rank]
            ax.set_xticks([])
            ax.set_yticks([])
            p = int(rows[rank])
            image = images[i * n_top + rank]
            if image.shape[0] == 3:
                ax.imshow(np.transpose(image, (1, 2, 0)), vmin=0, vmax=1)
            else:
                ax.imshow(image.mean(axis=0), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"W={W[p, i]:.4g}\ny={label[p]}", fontsize=7)
            if rank == 0:
                ax.set_ylabel(f"component {j}", fontsize=8)
    fig.savefig(path, dpi=dpi)
    return path


# -- perturbation test ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _eval_model(lake_url: str, run_id: str, checkpoint: int, dtype: str, device: str):
    """The checkpoint's model in ``dtype`` on ``device`` and a lock for it, once per process.

    ``functional_call`` swaps the module's parameters during a forward pass, so threads of one
    worker take turns on the shared module.
    """
    return cached_model(lake_url, run_id, checkpoint, dtype, device), threading.Lock()


def _component_row(group: zarr.Group, component: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, columns) of one component; columns is None for a dense row."""
    fmt = group.attrs["format"]
    if fmt in ("dense", "lowrank"):
        return np.asarray(group["H" if fmt == "dense" else "G"][component]), None
    start, stop = (int(v) for v in group["H_indptr"][component : component + 2])
    return np.asarray(group["H_data"][start:stop]), np.asarray(group["H_indices"][start:stop])


def _combined_row(group: zarr.Group, coefficients: dict[int, float]) -> np.ndarray:
    """``sum_i c_i h_i`` over the kept columns (float64), reading H once.

    A dense row of H is spread over every column chunk, so the rows are combined chunk by
    chunk rather than read one after another (which would read all of H once per row).
    """
    rows = np.fromiter(coefficients, dtype=np.int64)
    c = np.fromiter(coefficients.values(), dtype=np.float64)
    fmt = group.attrs["format"]
    if fmt == "csr":
        combined = np.zeros(int(group["kept_columns"].shape[0]))
        for i, ci in zip(rows, c, strict=True):
            values, columns = _component_row(group, int(i))
            combined[columns] += ci * np.asarray(values, dtype=np.float64)
        return combined
    array = group["H" if fmt == "dense" else "G"]
    n_columns, step = int(array.shape[1]), int(array.chunks[1])
    combined = np.empty(n_columns)
    for start in range(0, n_columns, step):
        block = array.get_orthogonal_selection((rows, slice(start, start + step)))
        combined[start : start + step] = c @ np.asarray(block, dtype=np.float64)
    return combined


def component_directions(
    lake: Lake | str, npeff_id: str, components: Sequence[int] | None = None
) -> dict[int, np.ndarray]:
    """Unit directions d_j (P,) of components of an npeff artifact (float64; default all)."""
    lake = _lake(lake)
    group = _npeff_group(lake, npeff_id)
    components = _components(group, components, npeff_id)
    kept = np.asarray(group["kept_columns"][:])
    n_params = int(group.attrs["n_parameters"])
    directions = {}
    for j in components:
        values, columns = _component_row(group, j)
        directions[j] = component_direction(values, kept, n_params, columns)
    return directions


def _perturb_task(
    lake_url: str,
    source: _Source,
    component: int,
    row: int,
    examples: dict[str, np.ndarray],
    options: dict,
    outputs: dict[str, zarr.Array],
    done: zarr.Array,
) -> int:
    """Perturb along component ``component``; write row ``row`` of every output, mark done."""
    group = open_lake(lake_url).group(source.npeff)
    kept, n_params = group["kept_columns"][:], int(group.attrs["n_parameters"])
    coefficients = options["coefficients"].get(component)
    if coefficients is None:
        values, columns = _component_row(group, component)
        direction = component_direction(values, kept, n_params, columns)
    else:  # isolated: the row combination sum_i c_i h_i over the kept columns
        direction = component_direction(_combined_row(group, coefficients), kept, n_params)
    split = cached_run_splits(lake_url, source.run).split(source.split)
    rows = np.concatenate([examples["top_rows"], examples["baseline_rows"]])
    model, lock = _eval_model(
        lake_url, source.run, source.checkpoint, options["dtype"], torch_device()
    )
    with lock:
        result = perturbation_kl(
            model, split.x[rows], direction, options["epsilon"], batch_size=options["batch_size"]
        )
    n_top = len(examples["top"])
    labels = np.concatenate([examples["top_labels"], examples["baseline_labels"]])
    correct = result.perturbed_logits.argmax(-1) == labels[None]
    correct_original = result.logits.argmax(-1) == labels
    kl_top, kl_baseline = result.kl[:, :n_top].mean(1), result.kl[:, n_top:].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = kl_top / kl_baseline
    outputs["kl_top"][row] = kl_top
    outputs["kl_baseline"][row] = kl_baseline
    outputs["kl_ratio"][row] = ratio
    outputs["accuracy_top"][row] = correct[:, :n_top].mean(1)
    outputs["accuracy_baseline"][row] = correct[:, n_top:].mean(1)
    outputs["accuracy_top_original"][row] = correct_original[:n_top].mean()
    outputs["accuracy_baseline_original"][row] = correct_original[n_top:].mean()
    outputs["top_example"][row] = examples["top"]
    outputs["baseline_example"][row] = examples["baseline"]
    done[row] = 1
    return row


def _isolation(
    G: np.ndarray, npeff_id: str, components: list[int], max_abs_cos: float
) -> dict[int, dict[int, float]]:
    """Non-zero isolation coefficients ``{j: {i: c_i}}`` from the components' Gram matrix;
    refuses a component in the span."""
    result = {}
    for j in components:
        c = isolation_coefficients(G, j, max_abs_cos)
        residual = float(c @ G @ c)
        if G[j, j] > 0 and residual <= 1e-12 * G[j, j]:
            raise UserInputError(
                f"{npeff_id}: component {j} lies in the span of the {np.count_nonzero(c) - 1} "
                f"components whose |cosine| with it is <= {max_abs_cos}; nothing is left to "
                "perturb along: use a smaller max_abs_cos"
            )
        result[j] = {int(i): float(c[i]) for i in np.flatnonzero(c)}
    return result


def run_perturbation(
    lake: Lake | str,
    npeff_id: str,
    *,
    components: Sequence[int] | None = None,
    epsilon: float = 0.1,
    n_top: int = 16,
    n_baseline: int | None = None,
    seed: int = 0,
    dtype: str = "float64",
    batch_size: int = 256,
    max_abs_cos: float | None = None,
    progress: bool = True,
) -> str:
    """Perturbation test of NPEFF components; return the ``npeff_perturbation`` artifact id.

    For each component j, θ' = θ ± ε d_j with d_j its unit direction (module docstring) and θ
    the checkpoint the PEFs were computed at; stores the mean KL(p_θ || p_θ') over the ``n_top``
    examples of largest W[:, j] and over ``n_baseline`` other examples drawn without
    replacement from ``rng([seed, j])`` (disjoint from the top ones), their ratio, and the
    accuracies. One task per component (resumable: a rerun computes only missing components).

    Args:
        lake: the lake (or its URL).
        npeff_id: an ``npeff`` artifact whose PEFs were computed in the lake (dense, csr or
            lowrank format).
        components: component indices (default: all).
        epsilon: ε >= 0, the L2 norm of the parameter move.
        n_top: top examples per component, 1..n-1.
        n_baseline: baseline examples per component, 1..n-n_top (default: min(128, n-n_top)).
        seed: seed of the baseline draws.
        dtype: ``float64`` (default: exact small-ε KLs) or ``float32`` forward passes.
        batch_size: examples per forward pass (does not change the result beyond rounding).
        max_abs_cos: isolate each direction: perturb along the part of h_j orthogonal to the
            span of every other component with |cosine| <= this (module docstring; ``None``:
            the plain direction). ``n_projected`` records how many were projected out.
        progress: show a progress bar.

    Raises:
        UserInputError: bad options, a zero component (no direction), or a component that
            lies in the span of the components it is to be isolated from (nothing left to move
            along).
    """
    lake = _lake(lake)
    group = _npeff_group(lake, npeff_id)
    fmt = group.attrs.get("format")
    if fmt not in FORMATS:
        raise UserInputError(f"{npeff_id} has format {fmt!r}; expected one of {FORMATS}")
    components = _components(group, components, npeff_id)
    n = int(group["W"].shape[0])
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.number)):
        raise UserInputError(f"epsilon must be a number >= 0, got {epsilon!r}")
    if not (np.isfinite(epsilon) and epsilon >= 0):
        raise UserInputError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if n < 2:
        raise UserInputError(f"{npeff_id} has {n} example(s); a perturbation test needs >= 2")
    if not _is_int(n_top) or not 1 <= n_top <= n - 1:
        raise UserInputError(f"n_top must be an integer in 1..{n - 1}, got {n_top!r}")
    if n_baseline is None:
        n_baseline = min(DEFAULT_N_BASELINE, n - n_top)
    if not _is_int(n_baseline) or not 1 <= n_baseline <= n - n_top:
        raise UserInputError(
            f"n_baseline must be an integer in 1..{n - n_top} (examples outside the top "
            f"{n_top}), got {n_baseline!r}"
        )
    if not _is_int(seed) or seed < 0:
        raise UserInputError(f"seed must be an integer >= 0, got {seed!r}")
    if dtype not in DTYPES:
        raise UserInputError(f"dtype={dtype!r} is not one of: {', '.join(DTYPES)}")
    if not _is_int(batch_size) or batch_size < 1:
        raise UserInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_abs_cos is not None and (
        isinstance(max_abs_cos, bool)
        or not isinstance(max_abs_cos, (int, float, np.number))
        or not 0 <= max_abs_cos <= 1
    ):
        raise UserInputError(f"max_abs_cos must be a number in [0, 1], got {max_abs_cos!r}")
    source = _source(lake, group, npeff_id)
    n_params = int(lake.group(source.run)["theta"].shape[1])
    if int(group.attrs["n_parameters"]) != n_params:
        raise UserInputError(
            f"{npeff_id} has {group.attrs['n_parameters']} parameters, its run {source.run} "
            f"{n_params}: not the same model"
        )
    split = cached_run_splits(lake.url, source.run).split(source.split)
    split_rows = _split_rows(split, group["sample_id"][:], source)
    labels = np.asarray(group["label"][:], dtype=np.int64)
    W = _w_columns(group, components)
    n_top, n_baseline, seed = int(n_top), int(n_baseline), int(seed)
    G = component_gram(lake, npeff_id)
    zero = [j for j in components if not G[j, j] > 0]
    if zero:
        raise UserInputError(
            f"component(s) {zero} of {npeff_id} are zero (their row of H is 0): there is no "
            "direction to perturb along (every KL would be 0 and the ratio undefined); leave "
            "them out with --components"
        )
    config = {
        "components": components,
        "epsilon": float(epsilon),
        "n_top": n_top,
        "n_baseline": n_baseline,
        "seed": seed,
        "dtype": dtype,
    }
    coefficients: dict[int, dict[int, float]] = {}
    if max_abs_cos is not None:
        config["max_abs_cos"] = float(max_abs_cos)
        coefficients = _isolation(G, npeff_id, components, float(max_abs_cos))
    writer = lake.begin("npeff_perturbation", config, [npeff_id])
    if writer.complete:
        return writer.id
    with writer:
        r = len(components)
        outputs = {
            name: writer.create_array(name, (r, len(SIGNS)), "float64")
            for name in ("kl_top", "kl_baseline", "kl_ratio", "accuracy_top", "accuracy_baseline")
        }
        for name in ("accuracy_top_original", "accuracy_baseline_original"):
            outputs[name] = writer.create_array(name, (r,), "float64")
        outputs["top_example"] = writer.create_array("top_example", (r, n_top), "int64")
        outputs["baseline_example"] = writer.create_array(
            "baseline_example", (r, n_baseline), "int64"
        )
        done = writer.progress("components", r)
        options = {
            "epsilon": float(epsilon),
            "dtype": dtype,
            "batch_size": int(batch_size),
            "coefficients": coefficients,
        }
        tasks = []
        for row in done.pending():
            top = _top_positions(W[:, row], n_top)
            baseline = _baseline_positions(n, top, n_baseline, seed, components[row])
            examples = {
                "top": top,
                "baseline": baseline,
                "top_rows": split_rows[top],
                "baseline_rows": split_rows[baseline],
                "top_labels": labels[top],
                "baseline_labels": labels[baseline],
            }
            tasks.append(
                (lake.url, source, components[row], row, examples, options, outputs, done.array)
            )
        run_tasks(_perturb_task, tasks, description="perturbations", progress=progress)
        writer.write("component", np.asarray(components, dtype=np.int64))
        writer.write("sign", np.asarray(SIGNS, dtype=np.int64))
        if max_abs_cos is not None:
            projected = [len(coefficients[j]) - 1 for j in components]
            writer.write("n_projected", np.asarray(projected, dtype=np.int64))
        writer.set_attrs(
            max_abs_cos=None if max_abs_cos is None else float(max_abs_cos),
            npeff=npeff_id,
            pefs=source.pefs,
            run=source.run,
            checkpoint=source.checkpoint,
            split=source.split,
            epsilon=float(epsilon),
            n_top=n_top,
            n_baseline=n_baseline,
            seed=seed,
            dtype=dtype,
        )
    return writer.commit()


__all__ = [
    "PerturbationKL",
    "TopExample",
    "component_direction",
    "component_directions",
    "component_gram",
    "isolation_coefficients",
    "kl_divergence",
    "model_logits",
    "perturbation_kl",
    "run_perturbation",
    "top_examples",
    "top_examples_collage",
    "top_examples_table",
]
