"""Agreement with skerch 1.x given the same sketches and test matrices (float64)."""

import numpy as np
import pytest

from curvlake.pipelines.hessian.recovery import (
    eigh_core,
    error_tail_bounds,
    hmt_core,
    nystrom_core,
    orthonormalize,
    oversampled_core,
    project,
    scree_bounds,
    singlepass_core,
)
from curvlake.pipelines.hessian.test_matrices import RandomTestMatrix
from tests._markers import requires_skerch
from tests.hessian.cases import low_rank_indefinite, poly_decay, symmetric

pytestmark = requires_skerch

D, K, S = 200, 10, 25


@pytest.fixture(scope="module")
def skerch_recovery():
    import skerch.recovery

    return skerch.recovery


def _t(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def _sketches(a, mode, kind="gaussian"):
    omega = RandomTestMatrix(kind, 0, "outer", (D, K)).to_dense()
    psi = RandomTestMatrix(kind, 0, "inner_right", (D, S)).to_dense()
    phi = RandomTestMatrix(kind, 0, "inner_left", (D, S)).to_dense()
    outer = psi[:, :K] if mode == "recycled" else omega
    return outer, psi, phi, a @ outer


def _ours(a, mode, outer, psi, phi, y):
    """Our raw core and Q from the same sketch (projections computed densely)."""
    q, r = orthonormalize(y)
    if mode == "hmt":
        core = hmt_core(project(q, a @ q))
    elif mode == "singlepass":
        core = singlepass_core(r, project(outer, q))
    elif mode == "nystrom":
        core = nystrom_core(r, project(outer, y))
    else:
        core = oversampled_core(project(phi, a @ psi), project(phi, q), project(psi, q))
    return q, core


def _theirs(skr, a, mode, outer, psi, phi, y, as_eigh):
    if mode == "hmt":
        return skr.hmt_h(_t(y), _t(a), as_eigh=as_eigh)
    if mode == "singlepass":
        return skr.singlepass_h(_t(y), _t(outer), as_eigh=as_eigh)
    if mode == "nystrom":
        return skr.nystrom_h(_t(y), _t(outer), as_eigh=as_eigh)
    return skr.oversampled_h(_t(y), _t(phi.T @ a @ psi), _t(phi.T), _t(psi), as_eigh=as_eigh)


MODES = ("hmt", "singlepass", "nystrom", "oversampled", "recycled")


@pytest.mark.parametrize("kind", ["gaussian", "ssrft"])
@pytest.mark.parametrize("mode", MODES)
def test_raw_approximation_matches_skerch(skerch_recovery, mode, kind):
    """Q C Qᵀ with the raw (unsymmetrized) core, on a full-rank indefinite spectrum."""
    a, _ = symmetric(poly_decay(D, 1.0), seed=1)
    outer, psi, phi, y = _sketches(a, mode, kind)
    q, core = _ours(a, mode, outer, psi, phi, y)
    # every skerch *_h(as_eigh=False) returns (core, P) with A ≈ P core Pᵀ
    their_core, p = _theirs(skerch_recovery, a, mode, outer, psi, phi, y, as_eigh=False)
    theirs = p.numpy() @ their_core.numpy() @ p.numpy().T
    ours = q @ core @ q.T
    np.testing.assert_allclose(ours, theirs, atol=1e-9 * np.abs(theirs).max())


@pytest.mark.parametrize("mode", MODES)
def test_eigenpairs_match_skerch_when_the_core_is_exact(skerch_recovery, mode):
    lam = low_rank_indefinite(D, K)
    a, _ = symmetric(lam, seed=2)
    outer, psi, phi, y = _sketches(a, mode)
    q, core = _ours(a, mode, outer, psi, phi, y)
    sol = eigh_core(core)
    ews, evs = _theirs(skerch_recovery, a, mode, outer, psi, phi, y, as_eigh=True)
    np.testing.assert_allclose(sol.eigenvalues, ews.numpy(), rtol=1e-9, atol=1e-9)
    u = q @ sol.rotation
    # eigenvalues are distinct: eigenvectors agree up to sign
    np.testing.assert_allclose(np.abs(np.sum(u * evs.numpy(), axis=0)), 1.0, atol=1e-8)


def test_tail_bounds_match_skerch():
    from skerch.a_posteriori import apost_error_bounds

    for q, eps, cplx in [(30, 0.5, False), (30, 0.5, True), (5, 0.25, False), (100, 1.0, False)]:
        theirs = list(apost_error_bounds(q, eps, is_complex=cplx).values())
        np.testing.assert_allclose(error_tail_bounds(q, eps, cplx), theirs, rtol=1e-12)


def test_scree_bounds_match_skerch():
    import torch
    from skerch.a_posteriori import scree_bounds as skerch_scree

    lam = poly_decay(12)
    lo, hi = skerch_scree(torch.from_numpy(lam), 0.3)
    ours = scree_bounds(lam, 0.3)
    np.testing.assert_allclose(ours.lower[:-1], lo.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ours.upper[:-1], hi.numpy(), rtol=1e-12)
