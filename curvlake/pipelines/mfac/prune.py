r"""Pruning into the lake: ``run_prune_oneshot`` and ``run_prune_gradual`` write one ``pruning``.

**What is pruned.** The *selected* tensors (default: every tensor with at least two dimensions,
i.e. the kernels of convolutions, downsample convolutions included, and of linear layers; biases
and normalisation parameters are kept; or the tensors whose name matches ``layers``). A sparsity
``s`` sets ``round(s·N)`` of their ``N`` weights to zero (``scope="global"``: one ranking over all
of them), or ``round(s·n_l)`` in each tensor (``scope="layer"``).

**M-FAC (OBS).** The weights ``w`` of the selected tensors that are still alive are scored by
``ρ_q = w_q² / (2 [F⁻¹]_qq)`` (:func:`~curvlake.pipelines.mfac.obs.obs_scores`), ``F = λI +
GᵀG/m`` the empirical Fisher of a gradient window on those coordinates; the lowest are removed
and the others updated by the summed single-weight OBS update ``δw = −F⁻¹ Σ_q (w_q/[F⁻¹]_qq)
e_q`` (or, ``update="group"``, the exact group solution for small groups), pruned weights
being zeroed exactly. With ``recompute=k`` a target is reached in ``k`` geometric density
steps (:func:`~curvlake.pipelines.mfac.obs.geometric_density_schedule`), each with a new window
at the current weights. The first window, at the checkpoint, is a ``grad_window`` artifact
(:func:`~curvlake.pipelines.mfac.grads.run_grad_window`, a Dask pipeline, on the selected
coordinates); later windows are at pruned weights that no checkpoint holds, so they are
computed here, from the next batches of the same stream. ``block_size`` uses the block-diagonal
Fisher of consecutive blocks of the selected coordinates instead (the seed's blocked variant).

**Magnitude.** The same counts by the smallest ``|w|``
(:meth:`curvlake.nn.masks.ParameterMask.magnitude`), no update. M-FAC results carry this
baseline beside them.

**One-shot** prunes each level from the checkpoint; **gradual** goes through the levels in
order, fine-tuning ``finetune_epochs`` epochs of SGD on the run's training data after each one,
the pruned weights held at zero after every step (masks re-applied). Levels are resumable: a
killed run recomputes only the levels it had not finished (gradual: from the last finished
one, whose weights and buffers are stored).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curvlake.constants import GRAD_ORDERS, MASK_SCOPES, OBS_UPDATES, PRUNE_METHODS
from curvlake.errors import UserInputError
from curvlake.lake import ArtifactWriter, Lake
from curvlake.nn.masks import ParameterMask
from curvlake.nn.params import LayerTable, table_arrays
from curvlake.pipelines.mfac.grads import (
    batch_positions,
    check_window_batches,
    loss_gradient_rows,
    run_grad_window,
)
from curvlake.pipelines.mfac.inverse_fisher import BlockedInverseFisher, InverseFisher
from curvlake.pipelines.mfac.obs import (
    geometric_density_schedule,
    group_obs_update,
    lowest_scores,
    obs_scores,
    summed_obs_update,
)
from curvlake.pipelines.skeleton import (
    DTYPE,
    POSITIVE_INT,
    SEED,
    SPLIT,
    RunInput,
    as_lake,
    resolve_run,
)
from curvlake.validation import Interval, Options, refuse_unused, validate_params

__all__ = [
    "GROUP_OBS_LIMIT",
    "MFAC_PRUNE_DEFAULTS",
    "quickstart_pruning",
    "run_prune_gradual",
    "run_prune_oneshot",
    "selected_tensors",
]

#: Defaults of the M-FAC pruner's options (``None`` in the entry points means these).
MFAC_PRUNE_DEFAULTS: dict[str, Any] = {
    "n_grads": 256,
    "batch_size": 8,
    "damp": 1e-5,
    "recompute": 1,
    "update": "summed",
    "split": "train",
    "order": "shuffled",
    "seed": 0,
}
#: The largest group the exact group OBS update forms ``[F⁻¹]_QQ`` for (|Q|² float64).
GROUP_OBS_LIMIT = 2048


def selected_tensors(table: LayerTable, layers: str | None) -> list[int]:
    """Indices of the tensors a pruner may prune: those matching the regular expression
    ``layers`` (``re.search``), or by default every tensor with at least two dimensions."""
    if layers is not None:
        return table.select(layers)
    chosen = [i for i, shape in enumerate(table.shapes) if len(shape) >= 2]
    if not chosen:
        raise UserInputError(
            "the model has no tensor with two or more dimensions to prune; select tensors with "
            "--layers PATTERN"
        )
    return chosen


def _exact_names(table: LayerTable, selected: Sequence[int]) -> str:
    """A pattern matching exactly the named tensors (for ParameterMask.magnitude)."""
    return "^(?:" + "|".join(re.escape(table.names[i]) for i in selected) + ")$"


@dataclass(frozen=True)
class _Plan:
    """The resolved and checked options of a pruning run."""

    lake: Lake
    run: RunInput
    checkpoint: int
    mode: str
    method: str
    sparsities: tuple[float, ...]
    scope: str
    layers: str | None
    table: LayerTable
    selected: tuple[int, ...]
    options: dict[str, Any]
    dtype: str
    finetune: dict[str, Any] = field(default_factory=dict)

    @property
    def coordinates(self) -> np.ndarray:
        """θ coordinates of the selected tensors, sorted."""
        slices = list(self.table.slices())
        return np.concatenate(
            [np.arange(slices[i][1].start, slices[i][1].stop) for i in self.selected]
        ).astype(np.int64)

    @property
    def sizes(self) -> np.ndarray:
        return self.table.sizes[list(self.selected)]

    def kept_counts(self, density: float) -> np.ndarray:
        """Weights kept per selected tensor (global: one total, as one entry)."""
        if self.scope == "global":
            return np.array([round(density * int(self.sizes.sum()))], dtype=np.int64)
        return np.array([round(density * int(n)) for n in self.sizes], dtype=np.int64)

    @property
    def mfac(self) -> bool:
        return self.method == "mfac"

    def config(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "method": self.method,
            "checkpoint": self.checkpoint,
            "sparsities": list(self.sparsities),
            "scope": self.scope,
            "layers": self.layers,
            **self.options,
            **({"dtype": self.dtype} if self.dtype != "float32" else {}),
            **self.finetune,
        }


_SPARSITIES = "a non-empty list of distinct sparsities in (0, 1)"


def _check_sparsities(sparsities: Any, increasing: bool) -> tuple[float, ...]:
    values = [sparsities] if isinstance(sparsities, int | float) else sparsities
    try:
        values = tuple(float(s) for s in values)
    except (TypeError, ValueError):
        raise UserInputError(
            f"sparsities={sparsities!r} is not valid: must be {_SPARSITIES}"
        ) from None
    if not values or any(not 0 < s < 1 for s in values) or len(set(values)) != len(values):
        raise UserInputError(f"sparsities={list(values)} is not valid: must be {_SPARSITIES}")
    if increasing and list(values) != sorted(values):
        raise UserInputError(
            f"sparsities={list(values)} is not valid: gradual pruning goes through increasing "
            "sparsities"
        )
    return values


def _plan(
    lake: Lake,
    run_id: str,
    *,
    mode: str,
    method: str,
    sparsities: Any,
    checkpoint: int,
    scope: str,
    layers: str | None,
    mfac_options: dict[str, Any],
    block_size: int | None,
    dtype: str,
) -> _Plan:
    """Check everything a pruning run needs before anything is staged."""
    run = resolve_run(lake, run_id)
    checkpoint = run.checkpoint_index(checkpoint)
    levels = _check_sparsities(sparsities, increasing=mode == "gradual")
    table = run.layer_table()
    selected = tuple(selected_tensors(table, layers))
    if method == "magnitude":
        refuse_unused(
            "to method='magnitude' (no inverse Fisher: only M-FAC takes them)",
            **mfac_options,
            block_size=block_size,
        )
        options: dict[str, Any] = {}
    else:
        options = {k: MFAC_PRUNE_DEFAULTS[k] if v is None else v for k, v in mfac_options.items()}
        if options["order"] == "sequential":
            refuse_unused("to order='sequential'", seed=mfac_options["seed"])
            options["seed"] = None
        options["block_size"] = block_size
    plan = _Plan(
        lake, run, checkpoint, mode, method, levels, scope, layers, table, selected, options, dtype
    )
    if plan.mfac:
        steps = options["recompute"] * (len(levels) if mode == "gradual" else 1)
        check_window_batches(
            run,
            options["split"],
            options["n_grads"],
            options["batch_size"],
            options["order"],
            start=(steps - 1) * options["n_grads"],
        )
        if options["update"] == "group":
            _check_group_sizes(plan)
    return plan


def _check_group_sizes(plan: _Plan) -> None:
    """The exact group update of every step stays within ``GROUP_OBS_LIMIT`` weights."""
    largest, start = 0, 1.0
    for sparsity in plan.sparsities:
        steps = plan.options["recompute"]
        densities = geometric_density_schedule(1 - sparsity, steps, start_density=start)
        alive = plan.kept_counts(start)
        for density in densities:
            kept = plan.kept_counts(density)
            largest = max(largest, int((alive - kept).sum()))
            alive = kept
        if plan.mode == "gradual":
            start = 1 - sparsity
    if largest > GROUP_OBS_LIMIT:
        raise UserInputError(
            f"update='group' would solve for {largest} weights at once (at most "
            f"{GROUP_OBS_LIMIT}): use more --recompute steps, a smaller sparsity, or the summed "
            "update"
        )


# -- one chain of pruning steps ----------------------------------------------------------------


@dataclass
class _Chain:
    """Weights being pruned: θ (float64), the alive selected coordinates, the buffers."""

    theta: np.ndarray
    alive: np.ndarray
    buffers: np.ndarray | None

    def copy(self) -> _Chain:
        buffers = None if self.buffers is None else self.buffers.copy()
        return _Chain(self.theta.copy(), self.alive.copy(), buffers)


class _Pruner:
    """The model, data and window stream of one pruning run, shared by its chains."""

    def __init__(self, plan: _Plan):
        from curvlake.engine import torch_device
        from curvlake.lake.checkpoints import load_model
        from curvlake.nn.params import flatten_buffers, flatten_parameters

        self.plan = plan
        self.device = torch_device()
        model = load_model(plan.lake, plan.run.run_id, plan.checkpoint)
        self.model = model.to(self.device)
        self.theta_dtype = np.dtype(plan.run.theta_dtype)
        self.torch_dtype = torch.float64 if self.theta_dtype == np.float64 else torch.float32
        buffers = flatten_buffers(model)
        self.dense = _Chain(
            flatten_parameters(model).astype(np.float64),
            plan.coordinates,
            buffers if buffers.size else None,
        )
        self.splits = plan.run.splits()
        self.layer_index = plan.table.layer_of(plan.coordinates)
        self._first_inverse: Any = None

    # -- the model at a chain's weights --------------------------------------------------------

    def load(self, chain: _Chain) -> torch.nn.Module:
        from curvlake.nn.params import assign_buffers, assign_parameters

        assign_parameters(self.model, chain.theta.astype(self.theta_dtype))
        if chain.buffers is not None:
            assign_buffers(self.model, chain.buffers)
        return self.model.eval()

    def evaluate(self, chain: _Chain) -> dict[str, float]:
        from curvlake.nn.training import evaluate

        test = self.splits.test
        return evaluate(self.load(chain), test.x, test.y, 1024, self.device)

    # -- inverse Fishers -----------------------------------------------------------------------

    def _operator(self, window: Any, window_id: str | None = None) -> Any:
        options = self.plan.options
        damp, block = options["damp"], options["block_size"]
        if window_id is not None:
            if block is None:
                return InverseFisher.from_lake(self.plan.lake, window_id, damp)
            return BlockedInverseFisher.from_lake(self.plan.lake, window_id, damp, block)
        if block is None:
            return InverseFisher(window, damp)
        return BlockedInverseFisher(window, damp, block)

    def first_inverse(self, window_id: str) -> tuple[Any, np.ndarray]:
        """F⁻¹ (and its diagonal) of the checkpoint's window, built once per run."""
        if self._first_inverse is None:
            operator = self._operator(None, window_id)
            diagonal = _host(operator.diagonal())
            self._first_inverse = (operator, diagonal)
        return self._first_inverse

    def inverse_at(self, chain: _Chain, window_index: int) -> tuple[Any, np.ndarray]:
        """F⁻¹ of a new window at the chain's weights on its alive coordinates: the window
        ``window_index`` of the gradient stream (batches ``[i·m, (i+1)·m)``)."""
        options = self.plan.options
        data = self.splits.split(options["split"])
        positions = batch_positions(
            len(data),
            options["n_grads"],
            options["batch_size"],
            options["order"],
            options["seed"],
            start=window_index * options["n_grads"],
        ).reshape(-1)
        dtype = getattr(torch, self.plan.dtype)  # the gradients are taken on copies in dtype
        grads = loss_gradient_rows(
            self.load(chain),
            torch.as_tensor(data.x[positions], dtype=dtype, device=self.device),
            torch.as_tensor(data.y[positions], device=self.device),
            options["batch_size"],
            columns=chain.alive,
            dtype=dtype,
            device=self.device,
        )
        operator = self._operator(grads.cpu().numpy())
        return operator, _host(operator.diagonal())

    # -- steps ---------------------------------------------------------------------------------

    def _removed(self, scores: np.ndarray, chain: _Chain, density: float) -> np.ndarray:
        """Positions (into ``chain.alive``) of the lowest scores down to ``density``."""
        plan = self.plan
        kept = plan.kept_counts(density)
        if plan.scope == "global":
            return lowest_scores(scores, max(0, chain.alive.size - int(kept[0])))
        layers = self.plan.table.layer_of(chain.alive)
        picked = []
        for tensor, keep in zip(plan.selected, kept, strict=True):
            here = layers == tensor
            count = max(0, int(here.sum()) - int(keep))
            picked.append(lowest_scores(scores, count, eligible=here))
        return np.sort(np.concatenate([np.zeros(0, np.int64), *picked]))

    def obs_step(self, chain: _Chain, operator: Any, diagonal: np.ndarray, density: float):
        """One OBS step on ``chain`` down to ``density`` with ``F⁻¹ = operator``."""
        weights = chain.theta[chain.alive]
        removed = self._removed(obs_scores(weights, diagonal), chain, density)
        if removed.size:
            if self.plan.options["update"] == "group":
                update, _ = group_obs_update(operator, weights, removed)
            else:
                update = summed_obs_update(operator, weights, removed, inverse_diagonal=diagonal)
            chain.theta[chain.alive] = weights + update
            chain.theta[chain.alive[removed]] = 0.0
        chain.alive = np.delete(chain.alive, removed)

    def magnitude_step(self, chain: _Chain, density: float) -> None:
        """Keep the largest ``|w|`` of the selected tensors down to ``density`` (no update)."""
        plan = self.plan
        kept = ParameterMask.magnitude(
            chain.theta,
            plan.table,
            fraction=density,
            scope=plan.scope,
            layers=_exact_names(plan.table, plan.selected),
        )
        alive = np.intersect1d(chain.alive, kept.indices, assume_unique=True)
        chain.theta[np.setdiff1d(chain.alive, alive, assume_unique=True)] = 0.0
        chain.alive = alive

    def prune_mfac(self, chain: _Chain, sparsity: float, window_id: str, first_window: int) -> None:
        """OBS steps from the chain's density down to ``1 − sparsity``; window
        ``first_window`` of the stream is the artifact's (the checkpoint's) when 0."""
        start = chain.alive.size / self.dense.alive.size
        steps = self.plan.options["recompute"]
        for j, density in enumerate(
            geometric_density_schedule(1 - sparsity, steps, start_density=start)
        ):
            index = first_window + j
            if index == 0:
                operator, diagonal = self.first_inverse(window_id)
            else:
                operator, diagonal = self.inverse_at(chain, index)
            self.obs_step(chain, operator, diagonal, float(density))

    # -- fine-tuning (gradual) -----------------------------------------------------------------

    def finetune(self, chain: _Chain, stage: int) -> None:
        """``finetune_epochs`` epochs of SGD on the training split, the pruned weights set
        back to zero after every step; the epochs' randomness is derived from the stage."""
        from curvlake.nn.params import flatten_buffers, flatten_parameters
        from curvlake.nn.training import TrainConfig, make_optimizer, train_one_epoch

        options = self.plan.finetune
        # the run's own batch size, augmentation, decay and seed (imported runs: defaults)
        stored = self.plan.lake.info(self.plan.run.run_id).config
        kept = ("batch_size", "augment", "augment_padding", "weight_decay", "seed")
        config = TrainConfig.from_dict(
            {
                **{key: stored[key] for key in kept if key in stored},
                "optimizer": "sgd",
                "momentum": 0.9,
                "lr": options["finetune_lr"],
                "device": self.device,
                **(
                    {"batch_size": options["finetune_batch_size"]}
                    if options["finetune_batch_size"]
                    else {}
                ),
            }
        )
        model = self.load(chain)
        keep = _kept_mask(self.plan, chain).to_tensors()
        multipliers = [keep[name].to(self.device, p.dtype) for name, p in model.named_parameters()]

        def reapply_masks(*_: Any) -> None:
            with torch.no_grad():
                for p, multiplier in zip(model.parameters(), multipliers, strict=True):
                    p.mul_(multiplier)

        optimizer = make_optimizer(model, config)
        train = self.splits.train
        epochs = options["finetune_epochs"]
        for e in range(epochs):
            train_one_epoch(
                model,
                optimizer,
                train.x,
                train.y,
                config,
                stage * epochs + e,
                self.device,
                pad_value=self.splits.pad_value,
                callback=reapply_masks,
            )
        model.eval()
        chain.theta = flatten_parameters(model).astype(np.float64)
        chain.theta[np.setdiff1d(self.plan.coordinates, chain.alive)] = 0.0
        if chain.buffers is not None:
            chain.buffers = flatten_buffers(model)


def _host(array: Any) -> np.ndarray:
    from curvlake._array import to_numpy

    if hasattr(array, "compute"):
        array = array.compute()
    return np.asarray(to_numpy(array), dtype=np.float64)


# -- the artifact ------------------------------------------------------------------------------


def _kept_mask(plan: _Plan, chain: _Chain) -> ParameterMask:
    """Every θ coordinate except the pruned ones."""
    kept = np.ones(plan.table.total, dtype=bool)
    kept[plan.coordinates] = False
    kept[chain.alive] = True
    return ParameterMask.from_bool(plan.table, kept)


def _level_record(plan: _Plan, chain: _Chain, level: int, role: str, config: dict) -> dict:
    """Mask artifact and counts of one chain at one level."""
    from curvlake.pipelines.masks import write_mask

    mask = _kept_mask(plan, chain)
    mask_id = write_mask(
        plan.lake,
        mask,
        source="prune",
        config={**config, "level": plan.sparsities[level], "chain": role},
        inputs=[plan.run.run_id],
        run=plan.run.run_id,
        checkpoint=plan.checkpoint,
        scope=plan.scope,
    )
    pruned_count = plan.coordinates.size - chain.alive.size
    layer_alive = np.bincount(plan.table.layer_of(chain.alive), minlength=len(plan.table))
    layer_pruned = np.zeros(len(plan.table), dtype=np.int64)
    for tensor in plan.selected:
        layer_pruned[tensor] = int(plan.table.sizes[tensor]) - int(layer_alive[tensor])
    return {
        "mask": mask_id,
        "achieved_sparsity": pruned_count / plan.coordinates.size,
        "layer_pruned": layer_pruned.tolist(),
    }


_LEVEL_METRICS = ("test_loss", "test_accuracy", "pruned_test_loss", "pruned_test_accuracy")


def _write_results(writer: ArtifactWriter, plan: _Plan, records: list[dict], dense: dict) -> None:
    roles = ("method", "baseline") if plan.mfac else ("method",)
    arrays: dict[str, Any] = {
        "sparsity": np.array(plan.sparsities),
        "achieved_sparsity": np.array([r["method"]["achieved_sparsity"] for r in records]),
        **table_arrays(plan.table),
        "selected": np.isin(np.arange(len(plan.table)), plan.selected),
    }
    for role in roles:
        prefix = "" if role == "method" else "baseline_"
        arrays[prefix + "mask"] = np.array([r[role]["mask"] for r in records], dtype=object)
        arrays[prefix + "layer_pruned"] = np.array(
            [r[role]["layer_pruned"] for r in records], dtype=np.int64
        )
        for metric in _LEVEL_METRICS:
            if metric.startswith("pruned_") and plan.mode != "gradual":
                continue
            arrays[prefix + metric] = np.array([r[role][metric] for r in records])
    writer.write_many(arrays)
    writer.set_attrs(
        method=plan.method,
        mode=plan.mode,
        run=plan.run.run_id,
        checkpoint=plan.checkpoint,
        scope=plan.scope,
        layers=plan.layers,
        grad_window=records[0].get("grad_window"),
        n_selected=int(plan.coordinates.size),
        dense_test_loss=dense["loss"],
        dense_test_accuracy=dense["accuracy"],
    )


def _first_window(plan: _Plan, progress: bool) -> str | None:
    """The checkpoint's gradient window on the selected coordinates (a Dask pipeline)."""
    if not plan.mfac:
        return None
    from curvlake.pipelines.masks import write_mask

    selection = write_mask(
        plan.lake,
        ParameterMask(plan.table, plan.coordinates),
        source="prune-selection",
        config={"layers": plan.layers, "selected": [plan.table.names[i] for i in plan.selected]},
        inputs=[plan.run.run_id],
        run=plan.run.run_id,
    )
    options = plan.options
    return run_grad_window(
        plan.lake,
        plan.run.run_id,
        n_grads=options["n_grads"],
        batch_size=options["batch_size"],
        checkpoint=plan.checkpoint,
        split=options["split"],
        order=options["order"],
        seed=options["seed"],
        mask=selection,
        dtype=plan.dtype,
        progress=progress,
    )


def _run(plan: _Plan, progress: bool) -> str:
    lake = plan.lake
    window_id = _first_window(plan, progress)
    config = plan.config()
    writer = lake.begin("pruning", config, [plan.run.run_id] + ([window_id] if window_id else []))
    if writer.complete:
        return writer.id
    with writer:
        _prune_levels(writer, plan, window_id, config, progress)
    return writer.commit()


def _prune_levels(
    writer: ArtifactWriter, plan: _Plan, window_id: str | None, config: dict, progress: bool
) -> None:
    from curvlake.pipelines.masks import load_mask
    from curvlake.progress import progress_bar

    pruner = _Pruner(plan)
    n_levels, n_params = len(plan.sparsities), plan.table.total
    roles = ("method", "baseline") if plan.mfac else ("method",)
    thetas = {
        role: writer.create_array(
            "theta" if role == "method" else "baseline_theta",
            (n_levels, n_params),
            pruner.theta_dtype,
        )
        for role in roles
    }
    buffers = {}
    if plan.mode == "gradual" and pruner.dense.buffers is not None:
        buffers = {
            role: writer.create_array(
                "buffers" if role == "method" else "baseline_buffers",
                (n_levels, pruner.dense.buffers.size),
                "float64",
            )
            for role in roles
        }
    done = writer.progress("levels", n_levels)
    saved = dict(done.array.attrs.get("levels", {}))
    dense = dict(done.array.attrs.get("dense") or pruner.evaluate(pruner.dense))
    done.array.attrs["dense"] = dense
    finished = done.done()
    chains = {role: pruner.dense.copy() for role in roles}
    if plan.mode == "gradual":
        prefix = int(np.argmin(np.append(finished, False)))
        finished[prefix:] = False
        if prefix:  # resume from the last finished level's weights
            for role in roles:
                chain = chains[role]
                chain.theta = np.asarray(thetas[role][prefix - 1], dtype=np.float64)
                kept = load_mask(plan.lake, saved[str(prefix - 1)][role]["mask"])
                chain.alive = np.intersect1d(plan.coordinates, kept.indices, assume_unique=True)
                if role in buffers:
                    chain.buffers = np.asarray(buffers[role][prefix - 1])
    bar = progress_bar(total=n_levels, desc=f"{plan.mode} pruning", disable=not progress)
    bar.update(int(finished.sum()))
    for level, sparsity in enumerate(plan.sparsities):
        if finished[level]:
            continue
        record: dict[str, Any] = {"grad_window": window_id}
        for role in roles:
            chain = chains[role] if plan.mode == "gradual" else pruner.dense.copy()
            if role == "method" and plan.mfac:
                first = level * plan.options["recompute"] if plan.mode == "gradual" else 0
                pruner.prune_mfac(chain, sparsity, window_id, first)
            else:
                pruner.magnitude_step(chain, 1 - sparsity)
            result = {}
            if plan.mode == "gradual":
                metrics = pruner.evaluate(chain)
                result["pruned_test_loss"] = metrics["loss"]
                result["pruned_test_accuracy"] = metrics["accuracy"]
                pruner.finetune(chain, level)
            metrics = pruner.evaluate(chain)
            result["test_loss"] = metrics["loss"]
            result["test_accuracy"] = metrics["accuracy"]
            result.update(_level_record(plan, chain, level, role, config))
            thetas[role][level] = chain.theta.astype(pruner.theta_dtype)
            if role in buffers:
                buffers[role][level] = chain.buffers
            record[role] = result
            chains[role] = chain
        saved[str(level)] = record
        done.array.attrs["levels"] = saved
        done.mark_done(level)
        bar.update()
    bar.close()
    _write_results(writer, plan, [saved[str(level)] for level in range(n_levels)], dense)


# -- entry points ------------------------------------------------------------------------------

_COMMON = {
    "method": [Options(*PRUNE_METHODS)],
    "scope": [Options(*MASK_SCOPES)],
    "n_grads": [None, *POSITIVE_INT],
    "batch_size": [None, *POSITIVE_INT],
    "damp": [None, Interval(float, 0, None, closed="neither")],
    "block_size": [None, *POSITIVE_INT],
    "recompute": [None, *POSITIVE_INT],
    "update": [None, Options(*OBS_UPDATES)],
    "split": [None, *SPLIT],
    "order": [None, Options(*GRAD_ORDERS)],
    "seed": [None, *SEED],
    "dtype": DTYPE,
}


@validate_params(_COMMON)
def run_prune_oneshot(
    lake: Lake | str,
    run_id: str,
    *,
    sparsities: Sequence[float] = (0.5, 0.7, 0.9),
    method: str = "mfac",
    checkpoint: int = -1,
    scope: str = "global",
    layers: str | None = None,
    n_grads: int | None = None,
    batch_size: int | None = None,
    damp: float | None = None,
    block_size: int | None = None,
    recompute: int | None = None,
    update: str | None = None,
    split: str | None = None,
    order: str | None = None,
    seed: int | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> str:
    """Prune a run's checkpoint to each of ``sparsities``, each level from the checkpoint.

    Args:
        lake: the lake (or its URL).
        run_id: a run of the lake (with its data).
        sparsities: targets in (0, 1): shares of the selected weights set to zero.
        method: ``mfac`` (OBS with the M-FAC inverse Fisher; the magnitude baseline is
            computed beside it) or ``magnitude``.
        checkpoint: checkpoint index (negative from the end).
        scope: ``global`` (one ranking over the selected tensors) or ``layer`` (each tensor
            pruned to the sparsity).
        layers: regular expression selecting the tensors to prune (default: every tensor with
            at least two dimensions; biases and norms are kept).
        n_grads: M-FAC: gradients per window (default 256).
        batch_size: M-FAC: examples per gradient (default 8; 1: per-example gradients).
        damp: M-FAC: λ of ``F = λI + GᵀG/m`` (default 1e-5).
        block_size: M-FAC: block-diagonal Fisher of blocks of this many selected weights
            (default: the full matrix).
        recompute: M-FAC: geometric steps per level, each with a new window (default 1).
        update: M-FAC: ``summed`` single-weight OBS updates (default) or exact ``group``
            OBS (at most ``GROUP_OBS_LIMIT`` weights per step).
        split, order, seed: M-FAC: where the gradients' examples come from (default the
            training split, shuffled, seed 0).
        dtype: dtype of the gradients (the m × m algebra is float64).

    Returns:
        The ``pruning`` artifact id (a killed run resumes by levels).

    Raises:
        UserInputError: bad values, M-FAC options with ``method="magnitude"``, a window the
            split cannot fill, a pattern matching no tensor.
    """
    lake = as_lake(lake)
    plan = _plan(
        lake,
        run_id,
        mode="oneshot",
        method=method,
        sparsities=sparsities,
        checkpoint=checkpoint,
        scope=scope,
        layers=layers,
        mfac_options=_mfac_options(
            n_grads, batch_size, damp, recompute, update, split, order, seed
        ),
        block_size=block_size,
        dtype=dtype,
    )
    return _run(plan, progress)


@validate_params(
    {
        **_COMMON,
        "finetune_epochs": POSITIVE_INT,
        "finetune_lr": [Interval(float, 0, None, closed="neither")],
        "finetune_batch_size": [None, *POSITIVE_INT],
    }
)
def run_prune_gradual(
    lake: Lake | str,
    run_id: str,
    *,
    sparsities: Sequence[float] = (0.5, 0.7, 0.9),
    method: str = "mfac",
    checkpoint: int = -1,
    scope: str = "global",
    layers: str | None = None,
    finetune_epochs: int = 1,
    finetune_lr: float = 0.01,
    finetune_batch_size: int | None = None,
    n_grads: int | None = None,
    batch_size: int | None = None,
    damp: float | None = None,
    block_size: int | None = None,
    recompute: int | None = None,
    update: str | None = None,
    split: str | None = None,
    order: str | None = None,
    seed: int | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> str:
    """Gradual pruning: the increasing ``sparsities`` in turn, each followed by
    ``finetune_epochs`` epochs of SGD (lr ``finetune_lr``, momentum 0.9, the run's batch size
    unless ``finetune_batch_size``) with the pruned weights held at zero.

    The other arguments are those of :func:`run_prune_oneshot`; each level's windows are
    taken at the fine-tuned weights (the first at the checkpoint). Metrics before fine-tuning
    are kept as ``pruned_test_*``.
    """
    lake = as_lake(lake)
    plan = _plan(
        lake,
        run_id,
        mode="gradual",
        method=method,
        sparsities=sparsities,
        checkpoint=checkpoint,
        scope=scope,
        layers=layers,
        mfac_options=_mfac_options(
            n_grads, batch_size, damp, recompute, update, split, order, seed
        ),
        block_size=block_size,
        dtype=dtype,
    )
    plan = _Plan(
        **{
            **plan.__dict__,
            "finetune": {
                "finetune_epochs": finetune_epochs,
                "finetune_lr": float(finetune_lr),
                "finetune_batch_size": finetune_batch_size,
            },
        }
    )
    return _run(plan, progress)


def _mfac_options(n_grads, batch_size, damp, recompute, update, split, order, seed) -> dict:
    return {
        "n_grads": n_grads,
        "batch_size": batch_size,
        "damp": None if damp is None else float(damp),
        "recompute": recompute,
        "update": update,
        "split": split,
        "order": order,
        "seed": seed,
    }


# -- quickstart --------------------------------------------------------------------------------


def quickstart_pruning(
    lake: Lake, cnn_run_id: str, echo: Callable[[str], None] = print
) -> dict[str, str]:
    """One-shot M-FAC vs magnitude pruning of the quickstart CNN at 50/70/90 % (a few seconds):
    a small window, the test accuracy table echoed, and the curve drawn next to the lake.

    Returns:
        ``{role: artifact id or figure path}``.
    """
    from curvlake.pipelines.mfac.plot import plot_pruning, pruning_table

    echo("one-shot pruning of the CNN: M-FAC (OBS, 256 gradients of 8 examples) vs magnitude")
    pruning_id = run_prune_oneshot(
        lake, cnn_run_id, sparsities=(0.5, 0.7, 0.9), recompute=2, progress=False
    )
    table = pruning_table(lake, pruning_id)
    for row in table["rows"]:
        echo(
            f"  sparsity {row['sparsity']:.0%}: test accuracy M-FAC {row['accuracy']:.3f}, "
            f"magnitude {row['baseline_accuracy']:.3f} (dense {table['dense_accuracy']:.3f})"
        )
    figure = Path(lake.url).parent / "quickstart-mfac-pruning.png"
    if not lake.local:
        figure = Path("quickstart-mfac-pruning.png")
    plot_pruning(lake, pruning_id, figure)
    return {
        "pruning": pruning_id,
        "grad_window": lake.group(pruning_id).attrs["grad_window"],
        "test accuracy against sparsity, M-FAC vs magnitude": str(figure),
    }
