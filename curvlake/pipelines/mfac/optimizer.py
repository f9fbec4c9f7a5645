r"""The M-FAC optimizer: preconditioning by the inverse empirical Fisher of a sliding window.

Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information", NeurIPS 2021 (arXiv 2107.03356), the dynamic algorithm. The window holds the last
``m = ngrads`` gradients ``g_i`` as the rows of ``G`` (a ring buffer); after inserting the
step's gradient ``g`` the step direction is

    u = F⁻¹ g,    F = λ I + (1/n) Gᵀ G,    n = min(count, m),

with ``count`` the number of gradients seen so far (during warm-up only the filled rows count,
so early steps are not dominated by ``1/λ`` as with the seed's fixed ``1/m``).

**Maths of one step.** With ``K = nλI + GGᵀ`` (research/mfac.md §1, Woodbury),
``F⁻¹ = λ⁻¹(I − GᵀK⁻¹G)``, and because ``g`` is the row ``i`` of the window, ``Gg = K e_i −
nλ e_i``, so

    u = F⁻¹ g = λ⁻¹ (g − Gᵀ K⁻¹ G g) = n Gᵀ K⁻¹ e_i        (no cancellation, one column of K⁻¹).

The optimizer keeps the Gram matrix ``GGᵀ`` and, once the window is full, ``M = K⁻¹``
(m × m, float64). Replacing slot ``i`` changes row and column ``i`` of ``K``; ``M`` is updated
in two rank-one steps with positive pivots: remove ``i`` (``M ← M − M_{:,i} M_{i,:} / M_ii``,
row/column ``i`` zeroed: the inverse of ``K`` without ``i``), then border with the new row
(``b = K'_{:,i}`` without its diagonal, ``w = M b``, Schur complement
``s = K'_ii − bᵀw ≥ mλ``: ``M ← M + wwᵀ/s``, ``M_{:,i} = M_{i,:} = −w/s``, ``M_ii = 1/s``).
Every ``refresh_every`` steps (default ``m``) ``M`` is recomputed from the Gram matrix by
Cholesky, which bounds the accumulated rounding.

The rank-one steps lose accuracy like ``ε·cond(K)^1.5``, so the column ``K⁻¹ e_i`` used for
the step gets one step of iterative refinement, ``c ← c + M(e_i − Kc)``, which restores the
accuracy of a fresh Cholesky solve (measured: 1e-5 → 1e-10 relative at ``cond(K) = 3e6``).

**Exact cost of one step** (d trained coordinates, full window):
``2 m d`` multiply-adds in two passes over the window (the Gram row ``G g`` and
``Gᵀ K⁻¹ e_i``), ``5 m²`` for the m × m algebra (3 for updating ``M``, 2 for the refinement),
``O(d)`` elementwise work (gathering gradients, momentum, applying the step), plus one Cholesky
and inverse, about ``m³`` flops, every ``refresh_every`` steps (``m²`` amortized with the
default): ``O(dm + m²)``. During warm-up (``count < m``) the ``c × c`` matrix (``c = count``)
is factored from scratch each step, ``2cd + c³/3``. ``refresh_every=1`` gives the seed's
``O(dm + m³)`` per step.

**Memory**: the window ``m × d`` in ``window_dtype`` (default: float64 for float64 models, else
float32) and two ``m × m`` float64 matrices, on the parameters' device.

**Step** (per parameter group: ``lr``, ``momentum`` μ, ``weight_decay`` wd):

1. ``g ← ∇L`` on the trained coordinates (``mask``; a parameter without a gradient counts as
   zero and is not updated this step); coupled decay (the seed, default): ``g ← g + wd·w``
   *before* ``g`` enters the window;
2. insert ``g`` into the window, ``u = F⁻¹ g``;
3. momentum as in the seed, an exponential average of preconditioned directions:
   ``v ← μ v + (1 − μ) u``, step with ``v``;
4. ``w ← w − lr·u`` (decoupled decay, ``decoupled_weight_decay=True``: ``w ← w − lr·wd·w −
   lr·u``, and ``g`` is not decayed).

The flat coordinate order is the order of the parameters in the groups (group after group).
When the optimizer gets ``model.parameters()`` (or groups listing them in that order), it is
the order of θ in :mod:`curvlake.nn.params`, so window columns are θ coordinates (the trained
ones, ascending, when a mask is given).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from curvlake.errors import UserInputError
from curvlake.pipelines.mfac._checks import check_damp, check_int
from curvlake.pipelines.mfac.inverse_fisher import InverseFisher

__all__ = ["MFAC"]


def _check_hyperparameters(lr: Any, momentum: Any, weight_decay: Any) -> None:
    if not (isinstance(lr, int | float) and lr >= 0):
        raise UserInputError(f"lr must be a number >= 0, got {lr!r}")
    if not (isinstance(momentum, int | float) and 0 <= momentum < 1):
        raise UserInputError(f"momentum must be in [0, 1), got {momentum!r}")
    if not (isinstance(weight_decay, int | float) and weight_decay >= 0):
        raise UserInputError(f"weight_decay must be a number >= 0, got {weight_decay!r}")


class MFAC(torch.optim.Optimizer):
    r"""M-FAC: ``w ← w − lr · F⁻¹ g`` with the empirical Fisher of the last ``ngrads``
    gradients (see the module docstring for the maths, cost and memory).

    Args:
        params: parameters or parameter groups (``lr``, ``momentum`` and ``weight_decay`` may
            be set per group). One window spans all of them.
        lr: learning rate.
        momentum: μ in ``v ← μv + (1 − μ)u`` (0 disables momentum).
        weight_decay: wd; added to the gradient before the window (coupled, as the seed) or
            applied to the weights directly (``decoupled_weight_decay=True``).
        ngrads: window size m (any m >= 1: no multiple-of-32 or m <= 1024 limit).
        damp: λ > 0.
        decoupled_weight_decay: decay the weights instead of the gradient.
        mask: the coordinates to train, explicitly (no zero-detection): a bool tensor per
            parameter (same shapes, in group order) or one flat bool vector over all of them.
            ``False`` coordinates are dropped from the window and get no update, momentum or
            decay, so a pruned weight that is zero stays exactly zero (the optimizer does not
            zero it itself). ``None`` trains every coordinate.
        refresh_every: recompute ``K⁻¹`` by Cholesky every that many steps once the window is
            full (default ``ngrads``; 1 recomputes it every step).
        window_dtype: dtype of the stored window (default: float64 if a parameter is float64,
            else float32). The m × m algebra is always float64.

    Raises:
        UserInputError: bad hyperparameters, a malformed mask, parameters on several devices.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = MFAC(model.parameters(), lr=0.1, ngrads=8, damp=1e-3)
        >>> loss = model(torch.ones(2, 3)).pow(2).sum()
        >>> loss.backward()
        >>> opt.step()
        >>> opt.state_dict()["mfac"]["count"]
        1
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        ngrads: int = 1024,
        damp: float = 1e-5,
        decoupled_weight_decay: bool = False,
        mask: torch.Tensor | Sequence[torch.Tensor] | np.ndarray | None = None,
        refresh_every: int | None = None,
        window_dtype: torch.dtype | None = None,
    ):
        _check_hyperparameters(lr, momentum, weight_decay)
        self._frozen = False
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.ngrads = check_int("ngrads", ngrads)
        self.damp = check_damp(damp)
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
        self.refresh_every = (
            self.ngrads if refresh_every is None else check_int("refresh_every", refresh_every)
        )
        self._params = [p for group in self.param_groups for p in group["params"]]
        devices = {p.device for p in self._params}
        if len(devices) > 1:
            raise UserInputError(f"MFAC needs all parameters on one device, got {devices}")
        self._device = devices.pop() if devices else torch.device("cpu")
        if window_dtype is None:
            float64 = any(p.dtype == torch.float64 for p in self._params)
            window_dtype = torch.float64 if float64 else torch.float32
        if not window_dtype.is_floating_point:
            raise UserInputError(f"window_dtype must be a floating dtype, got {window_dtype}")
        self.window_dtype = window_dtype
        self._sizes = [p.numel() for p in self._params]
        self._n_params = sum(self._sizes)
        self._masks, self._kept = self._resolve_mask(mask)
        self._n_coordinates = self._n_params if self._kept is None else int(self._kept.numel())
        self._window: torch.Tensor | None = None
        self._gram: torch.Tensor | None = None
        self._inverse: torch.Tensor | None = None
        self._count = 0
        self._slot = 0
        self._since_refresh = 0
        self._frozen = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (only while constructing: the window spans a fixed set of parameters)."""
        if getattr(self, "_frozen", False):
            raise UserInputError(
                "MFAC's window spans the parameters given at construction; build a new "
                "optimizer to add a parameter group"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group["lr"], group["momentum"], group["weight_decay"])

    # -- mask ----------------------------------------------------------------------------------

    def _resolve_mask(self, mask: Any) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        if mask is None:
            return [None] * len(self._params), None
        if isinstance(mask, torch.Tensor | np.ndarray):
            flat = torch.as_tensor(mask)
            if flat.dtype != torch.bool or flat.shape != (self._n_params,):
                raise UserInputError(
                    f"a flat mask must be a bool vector of shape ({self._n_params},), got "
                    f"{flat.dtype} {tuple(flat.shape)}"
                )
            parts = list(torch.split(flat.to(self._device), self._sizes))
            masks = [part.view(p.shape) for part, p in zip(parts, self._params, strict=True)]
        else:
            masks = [torch.as_tensor(part) for part in mask]
            if len(masks) != len(self._params):
                raise UserInputError(
                    f"mask has {len(masks)} tensors but the optimizer has {len(self._params)} "
                    "parameters"
                )
            for k, (part, p) in enumerate(zip(masks, self._params, strict=True)):
                if part.dtype != torch.bool or part.shape != p.shape:
                    raise UserInputError(
                        f"mask tensor {k} must be bool with shape {tuple(p.shape)}, got "
                        f"{part.dtype} {tuple(part.shape)}"
                    )
            masks = [part.to(self._device) for part in masks]
        kept = torch.cat([part.reshape(-1) for part in masks]).nonzero().reshape(-1)
        return list(masks), kept

    # -- window --------------------------------------------------------------------------------

    def _flat_gradient(self) -> tuple[torch.Tensor, list[bool]]:
        """The step's gradient on the trained coordinates (coupled decay included)."""
        parts, has_grad = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    parts.append(torch.zeros(p.numel(), dtype=self.window_dtype, device=p.device))
                    has_grad.append(False)
                    continue
                if p.grad.is_sparse:
                    raise UserInputError("MFAC does not support sparse gradients")
                grad = p.grad.reshape(-1).to(self.window_dtype)
                if group["weight_decay"] and not self.decoupled_weight_decay:
                    grad = grad.add(p.detach().reshape(-1).to(self.window_dtype),
                                    alpha=group["weight_decay"])  # fmt: skip
                parts.append(grad)
                has_grad.append(True)
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=self.window_dtype)
        return (flat if self._kept is None else flat[self._kept]), has_grad

    def _insert(self, gradient: torch.Tensor) -> torch.Tensor:
        """Put ``gradient`` into the ring buffer; return ``u = F⁻¹ g`` on the window's
        coordinates."""
        m = self.ngrads
        if self._window is None:
            self._window = torch.zeros(
                (m, self._n_coordinates), dtype=self.window_dtype, device=self._device
            )
            self._gram = torch.zeros((m, m), dtype=torch.float64, device=self._device)
        window, gram, slot = self._window, self._gram, self._slot
        window[slot] = gradient
        self._count += 1
        n = min(self._count, m)
        row = (window[:n] @ gradient).to(torch.float64)
        gram[slot, :n] = row
        gram[:n, slot] = row
        if self._count < m:
            # Warm-up: the filled slots are 0..n-1 and n changes every step.
            factor = torch.linalg.cholesky(self._kernel(n))
            unit = torch.zeros((n, 1), dtype=torch.float64, device=self._device)
            unit[slot] = 1.0
            column = torch.cholesky_solve(unit, factor)[:, 0]
        else:
            if self._inverse is None or self._since_refresh + 1 >= self.refresh_every:
                self._refresh()
            else:
                self._replace_slot(slot, row)
                self._since_refresh += 1
            column = self._refined_column(slot)
        self._slot = (slot + 1) % m
        return (window[:n].T @ column.to(self.window_dtype)) * n

    def _kernel(self, n: int) -> torch.Tensor:
        """``K = nλI + GGᵀ`` of the first n slots (float64)."""
        kernel = self._gram[:n, :n].clone()
        kernel.diagonal().add_(n * self.damp)
        return kernel

    def _refresh(self) -> None:
        factor, info = torch.linalg.cholesky_ex(self._kernel(self.ngrads))
        if info.item() != 0:
            raise UserInputError(
                f"K = m·damp·I + G Gᵀ is not numerically positive definite (damp={self.damp:g}): "
                "increase damp"
            )
        self._inverse = torch.cholesky_inverse(factor)
        self._since_refresh = 0

    def _refined_column(self, slot: int) -> torch.Tensor:
        """``K⁻¹ e_slot`` from ``M ≈ K⁻¹`` plus one step of iterative refinement
        ``c ← c + M (e_slot − K c)``: the rank-one updates leave ``M`` accurate only to about
        ``ε·cond(K)^1.5``; one step brings the column back to the accuracy of a fresh solve."""
        column = self._inverse[:, slot]
        residual = -(self._gram @ column + self.ngrads * self.damp * column)
        residual[slot] += 1.0
        return column + self._inverse @ residual

    def _replace_slot(self, slot: int, row: torch.Tensor) -> None:
        """Update ``M = K⁻¹`` for the new row/column ``slot`` of K (row = the Gram row)."""
        inverse = self._inverse
        shift = self.ngrads * self.damp
        column = inverse[:, slot].clone()
        inverse.sub_(torch.outer(column, column / column[slot]))
        inverse[slot].zero_()
        inverse[:, slot].zero_()
        border = row.clone()
        border[slot] = 0.0
        bordered = inverse @ border
        # The Schur complement is 1 / [K'⁻¹]_ii >= the smallest eigenvalue of K' >= mλ; the
        # clamp only guards against rounding and never binds in exact arithmetic.
        schur = torch.clamp(row[slot] + shift - border @ bordered, min=shift)
        inverse.add_(torch.outer(bordered, bordered / schur))
        inverse[slot] = -bordered / schur
        inverse[:, slot] = -bordered / schur
        inverse[slot, slot] = 1.0 / schur

    # -- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One M-FAC step (``closure`` re-evaluates the loss, as for other torch optimizers)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gradient, has_grad = self._flat_gradient()
        direction = self._insert(gradient)
        if self._kept is not None:
            full = torch.zeros(self._n_params, dtype=direction.dtype, device=self._device)
            full[self._kept] = direction
            direction = full
        parts = torch.split(direction, self._sizes)
        k = 0
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                part, keep, updated = parts[k], self._masks[k], has_grad[k]
                k += 1
                if not updated:
                    continue
                update = part.view(p.shape).to(p.dtype)
                if momentum > 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buffer = state["momentum_buffer"]
                    buffer.mul_(momentum).add_(update, alpha=1 - momentum)
                    update = buffer
                if self.decoupled_weight_decay and decay:
                    p.add_(p if keep is None else p * keep, alpha=-lr * decay)
                p.add_(update, alpha=-lr)
        return loss

    # -- analysis and state --------------------------------------------------------------------

    @property
    def trained_coordinates(self) -> torch.Tensor | None:
        """Flat indices of the coordinates in the window (``None``: all of them)."""
        return self._kept

    def inverse_fisher(self) -> InverseFisher:
        """The current ``F⁻¹`` (filled rows, ``n = min(count, m)``) as an
        :class:`~curvlake.pipelines.mfac.InverseFisher` over the window's coordinates (a
        float64 NumPy copy of the window)."""
        if self._count == 0:
            raise UserInputError("the M-FAC window is empty: take a step first")
        n = min(self._count, self.ngrads)
        window = self._window[:n].detach().to("cpu", torch.float64).numpy()
        return InverseFisher(window, self.damp)

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus ``"mfac"``: the window, its Gram matrix, ``K⁻¹``, the
        slot pointer, the gradient count and the refresh counter (tensors by reference, as
        torch does)."""
        state = super().state_dict()
        state["mfac"] = {
            "ngrads": self.ngrads,
            "damp": self.damp,
            "n_coordinates": self._n_coordinates,
            "count": self._count,
            "slot": self._slot,
            "since_refresh": self._since_refresh,
            "window": self._window,
            "gram": self._gram,
            "inverse": self._inverse,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, so that the next steps are bit for bit those of the
        run that saved it (tensors are copied)."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("mfac", None)
        if saved is None:
            raise UserInputError("this state_dict has no 'mfac' entry: not saved by MFAC")
        for key, mine in (
            ("ngrads", self.ngrads),
            ("damp", self.damp),
            ("n_coordinates", self._n_coordinates),
        ):
            if saved[key] != mine:
                raise UserInputError(
                    f"the saved M-FAC state has {key}={saved[key]!r} but this optimizer has "
                    f"{mine!r}"
                )
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "momentum_buffer" in state:
                state["momentum_buffer"] = state["momentum_buffer"].clone()

        def copy(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
            if tensor is None:
                return None
            return tensor.detach().to(device=self._device, dtype=dtype, copy=True)

        self._window = copy(saved["window"], self.window_dtype)
        self._gram = copy(saved["gram"], torch.float64)
        self._inverse = copy(saved["inverse"], torch.float64)
        self._count = int(saved["count"])
        self._slot = int(saved["slot"])
        self._since_refresh = int(saved["since_refresh"])
