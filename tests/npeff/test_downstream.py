"""NPEFF downstream analyses: top examples, collages, perturbation tests (research §4, §7.7).

The lake tests use a planted toy problem: a logistic regression on 4 features where a small
group A (20 of 200 examples) lives on features 0-1 and the rest (group B) on features 2-3
(the other features are 100x smaller). Component 0 is planted on the weights of features 0-1
with group A as its top examples, component 1 on the weights of features 2-3, so moving along
component 0 changes group A's predictions and barely touches the baseline.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.lake.checkpoints import flatten_parameters
from curvlake.pipelines.data import import_dataset
from curvlake.pipelines.npeff import downstream
from curvlake.pipelines.npeff.compute_pefs import run_pefs
from curvlake.pipelines.npeff.downstream import (
    component_direction,
    component_directions,
    component_gram,
    isolation_coefficients,
    kl_divergence,
    perturbation_kl,
    run_perturbation,
    top_examples,
    top_examples_collage,
    top_examples_table,
)
from curvlake.pipelines.train import run_train
from curvlake.storage_schema import SPECS
from curvlake.storage_schema import npeff_perturbation as perturbation_schema

N, N_A, D = 200, 20, 4
KEPT = np.arange(8, dtype=np.int64)  # the weights of Linear(4, 2); the biases 8, 9 are pruned
H_PLANTED = np.array(
    [[1.0, 2.0, 0, 0, 0, 0, 0, 0], [0, 0, 2.0, 1.0, 0, 0, 0, 0]]
)  # class-0 weights of features 0-1, resp. 2-3


@pytest.fixture(autouse=True, scope="module")
def _setup():
    """One intra-op thread (tiny tensors, shared 2-core box); the kind registered if the lead
    has not yet listed it in ``_KIND_MODULES``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        if "npeff_perturbation" not in SPECS:
            patch.setitem(SPECS, "npeff_perturbation", perturbation_schema.SPEC)
        yield
    torch.set_num_threads(threads)


def _planted_x(n: int, n_a: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D))
    x[:n_a, 2:] *= 0.01  # group A: features 0-1
    x[n_a:, :2] *= 0.01  # group B: features 2-3
    return x.astype(np.float32)


def _planted_run(lake, tmp_path, name: str, shape: tuple[int, ...], standardize: str):
    x, x_test = _planted_x(N, N_A, 0), _planted_x(40, 4, 1)
    y, y_test = (x[:, 0] + x[:, 2] > 0).astype(np.int64), (x_test[:, 0] > 0).astype(np.int64)
    path = tmp_path / f"{name}.npz"
    np.savez(path, x=x.reshape(-1, *shape), y=y, x_test=x_test.reshape(-1, *shape), y_test=y_test)
    dataset = import_dataset(lake, path)
    config = {
        "model": "mlp",
        "model_params": {"widths": []},  # logistic regression: Linear(4, 2)
        "dataset": dataset,
        "standardize": standardize,
        "val_size": 0,
        "epochs": 1,
        "lr": 0.5,
        "batch_size": 50,
        "device": "cpu",
    }
    run_id = run_train(lake, config, progress=False)
    pefs_id = run_pefs(lake, run_id, k=4, block_size=64, progress=False)
    return x, run_id, pefs_id


def _write_npeff(lake, pefs_id, fmt: str, H: np.ndarray, W: np.ndarray | None = None) -> str:
    pefs = lake.open(pefs_id)
    sample_id = pefs["sample_id"].values
    if W is None:  # planted: component 0 on group A (sample ids < N_A), component 1 on group B
        rng = np.random.default_rng(7)
        in_a = sample_id < N_A
        W = np.where(in_a[:, None], [[1.0, 0.0]], [[0.0, 1.0]]) + 0.01 * rng.random((len(in_a), 2))
    writer = lake.begin("npeff", {"planted": fmt, "H": H.tolist()}, [pefs_id])
    if writer.complete:
        return writer.id
    writer.write("W", W)
    if fmt == "csr":
        rows, cols = np.nonzero(H)
        writer.write("H_data", H[rows, cols].astype(np.float32))
        writer.write("H_indices", cols.astype(np.int64))
        writer.write("H_indptr", np.searchsorted(rows, np.arange(H.shape[0] + 1)).astype(np.int64))
    else:
        writer.write("H" if fmt == "dense" else "G", H.astype(np.float32))
    writer.write("kept_columns", KEPT)
    writer.write("loss", np.zeros(0))
    writer.write("seconds", np.zeros(0))
    writer.write("label", pefs["label"].values)
    writer.write("sample_id", sample_id)
    writer.set_attrs(
        format=fmt,
        n_components=H.shape[0],
        n_parameters=10,
        solver="planted",
        converged=True,
        pefs=pefs_id,
    )
    return writer.commit()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("downstream")
    lake = open_lake(tmp / "lake", create=True)
    x, run_id, pefs_id = _planted_run(lake, tmp, "tabular", (D,), "none")
    npeffs = {fmt: _write_npeff(lake, pefs_id, fmt, H_PLANTED) for fmt in ("dense", "csr")}
    npeffs["lowrank"] = _write_npeff(lake, pefs_id, "lowrank", H_PLANTED * [[1], [-1]])
    return {"lake": lake, "x": x, "run": run_id, "pefs": pefs_id, **npeffs}


# -- kernels -------------------------------------------------------------------------------------


def test_kl_divergence_against_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 30, 5)) * 3
    kl = kl_divergence(a, b)
    p, q = scipy.special.softmax(a, axis=1), scipy.special.softmax(b, axis=1)
    np.testing.assert_allclose(kl, scipy.stats.entropy(p, q, axis=1), rtol=1e-12, atol=1e-15)
    assert (kl >= 0).all() and kl.dtype == np.float64
    np.testing.assert_array_equal(kl_divergence(a, a), np.zeros(30))
    # p_c underflowing to 0 contributes 0, not NaN; log-space keeps tiny q_c finite
    assert kl_divergence([[0.0, -1e4]], [[0.0, 5.0]])[0] == pytest.approx(np.log1p(np.exp(5.0)))
    assert kl_divergence([[0.0, 0.0]], [[0.0, -1e5]])[0] == pytest.approx(0.5e5, rel=1e-4)


def test_component_direction_unit_norm_and_zero_outside_kept():
    kept = np.array([1, 4, 6, 9])
    d = component_direction([3.0, 0.0, 4.0, 0.0], kept, 12)
    expected = np.zeros(12)
    expected[[1, 6]] = [0.6, 0.8]
    np.testing.assert_array_equal(d, expected)
    sparse = component_direction([3.0, 4.0], kept, 12, columns=[0, 2])
    np.testing.assert_array_equal(sparse, expected)
    np.testing.assert_array_equal(component_direction(np.zeros(4), kept, 12), np.zeros(12))


def test_top_positions_break_ties_by_index():
    w = np.array([0.5, 2.0, 0.5, 2.0, 1.0, 0.5])
    np.testing.assert_array_equal(downstream._top_positions(w, 5), [1, 3, 4, 0, 2])


def _logreg(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double().eval()


def test_perturbation_kl_matches_float64_oracle_and_leaves_weights():
    model = _logreg()
    x = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = flatten_parameters(model).copy()
    n_params = before.size
    d = np.random.default_rng(2).standard_normal(n_params)
    d /= np.linalg.norm(d)
    eps = 0.3
    result = perturbation_kl(model, x, d, eps, batch_size=3)
    np.testing.assert_array_equal(flatten_parameters(model), before)

    def logits_at(theta):
        w1, b1 = theta[:12].reshape(3, 4), theta[12:15]
        w2, b2 = theta[15:24].reshape(3, 3), theta[24:]
        return np.tanh(x.numpy() @ w1.T + b1) @ w2.T + b2

    theta = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
    np.testing.assert_allclose(result.logits, logits_at(theta), rtol=1e-12)
    for i, sign in enumerate((1, -1)):
        expected = logits_at(theta + sign * eps * d)
        np.testing.assert_allclose(result.perturbed_logits[i], expected, rtol=1e-12)
        p, q = scipy.special.softmax(logits_at(theta), 1), scipy.special.softmax(expected, 1)
        np.testing.assert_allclose(result.kl[i], scipy.stats.entropy(p, q, axis=1), rtol=1e-9)
    assert (result.kl > 0).all()
    zero = perturbation_kl(model, x, d, 0.0)
    np.testing.assert_array_equal(zero.kl, np.zeros((2, 7)))


def test_perturbation_kl_restores_weights_when_forward_fails():
    model = _logreg()
    before = flatten_parameters(model).copy()
    with pytest.raises(RuntimeError):
        perturbation_kl(model, torch.zeros(2, 5, dtype=torch.float64), np.ones(27), 1.0)
    np.testing.assert_array_equal(flatten_parameters(model), before)
    assert all(type(p) is nn.Parameter for p in model.parameters())


# -- top examples ------------------------------------------------------------------------------


def test_top_examples_and_table(planted):
    lake, npeff_id = planted["lake"], planted["dense"]
    ds = lake.open(npeff_id)
    W, sample_id = ds["W"].values, ds["sample_id"].values
    top = top_examples(lake, npeff_id, n_top=N_A)
    assert list(top) == [0, 1]
    assert set(sample_id[top[0]]) == set(range(N_A))  # planted: group A
    for j, positions in top.items():
        np.testing.assert_array_equal(positions, np.argsort(-W[:, j], kind="stable")[:N_A])
    assert top_examples(lake, npeff_id, components=[1], n_top=10**6)[1].size == N

    rows = top_examples_table(lake, npeff_id, components=[1, 0], n_top=3)
    assert [(r.component, r.rank) for r in rows] == [(1, 0), (1, 1), (1, 2), (0, 0), (0, 1), (0, 2)]
    for r in rows:
        assert r.w == W[r.example, r.component] and r.sample_id == sample_id[r.example]
        assert r.label == ds["label"].values[r.example]
    assert rows[3].example == top[0][0]

    for bad in ([2], [-1], [0, 0], [], [0.5]):
        with pytest.raises(UserInputError, match="component"):
            top_examples(lake, npeff_id, components=bad)
    for bad in (0, -3, 1.5):
        with pytest.raises(UserInputError, match="n_top"):
            top_examples(lake, npeff_id, n_top=bad)
    with pytest.raises(UserInputError, match="not a npeff"):
        top_examples(lake, planted["pefs"])
    with pytest.raises(UserInputError, match="not images"):  # inputs are D x 1 x 1 features
        top_examples_collage(lake, npeff_id, "unused.png")


def test_collage_of_images_shows_raw_pixels(planted, tmp_path):
    lake = planted["lake"]
    x, _, pefs_id = _planted_run(lake, tmp_path, "images", (1, 2, 2), "train")
    npeff_id = _write_npeff(lake, pefs_id, "dense", H_PLANTED)
    sample_id = lake.open(npeff_id)["sample_id"].values
    source = downstream._source(lake, lake.group(npeff_id), npeff_id)
    raw = downstream._raw_images(lake, source, sample_id[:7])
    np.testing.assert_allclose(raw, x[sample_id[:7]].reshape(7, 1, 2, 2), atol=1e-5)

    path = top_examples_collage(lake, npeff_id, tmp_path / "top.png", components=[1, 0], n_top=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserInputError, match="n_top"):
        top_examples_collage(lake, npeff_id, tmp_path / "bad.png", n_top=0)


# -- perturbations -------------------------------------------------------------------------------


def test_planted_component_has_large_kl_ratio(planted):
    lake = planted["lake"]
    pid = run_perturbation(
        lake, planted["dense"], epsilon=1.0, n_top=N_A, n_baseline=100, progress=False
    )
    ds = lake.open(pid)
    assert ds["sign"].values.tolist() == [1, -1] and ds["component"].values.tolist() == [0, 1]
    kl_top, kl_baseline = ds["kl_top"].values, ds["kl_baseline"].values
    assert (kl_top > 0).all() and (kl_baseline >= 0).all()
    np.testing.assert_array_equal(ds["kl_ratio"].values, kl_top / kl_baseline)
    assert (ds["kl_ratio"].values[0] > 100).all()  # planted: only group A moves
    assert (ds["kl_ratio"].values[1] < 10).all()  # its top examples are like the baseline
    top = top_examples(lake, planted["dense"], n_top=N_A)
    sample_id = lake.open(planted["dense"])["sample_id"].values
    for row, j in enumerate((0, 1)):
        np.testing.assert_array_equal(ds["top_example"].values[row], top[j])
        baseline = ds["baseline_example"].values[row]
        assert len(set(baseline)) == 100 and not set(baseline) & set(top[j])
    assert set(sample_id[ds["baseline_example"].values[0]]).isdisjoint(range(N_A))
    for name in ("accuracy_top", "accuracy_baseline", "accuracy_top_original"):
        assert ((ds[name].values >= 0) & (ds[name].values <= 1)).all()
    assert ds.attrs["epsilon"] == 1.0 and ds.attrs["run"] == planted["run"]

    # the same KLs from the sparse and the (sign-flipped) LRM forms of the same directions
    for fmt in ("csr", "lowrank"):
        other = lake.open(
            run_perturbation(
                lake, planted[fmt], epsilon=1.0, n_top=N_A, n_baseline=100, progress=False
            )
        )
        flip = [1, 0] if fmt == "lowrank" else [0, 1]  # G_1 = -H_1: the signs swap
        np.testing.assert_allclose(other["kl_top"].values[0], kl_top[0], rtol=1e-12)
        np.testing.assert_allclose(other["kl_top"].values[1], kl_top[1, flip], rtol=1e-12)
        np.testing.assert_array_equal(
            other["baseline_example"].values, ds["baseline_example"].values
        )


def test_directions_unit_norm_and_zero_outside_kept_columns(planted):
    for fmt in ("dense", "csr", "lowrank"):
        directions = component_directions(planted["lake"], planted[fmt])
        for j, d in directions.items():
            assert d.shape == (10,) and np.linalg.norm(d) == pytest.approx(1, abs=1e-15)
            assert (d[8:] == 0).all()
            np.testing.assert_allclose(np.abs(d[KEPT]), H_PLANTED[j] / np.linalg.norm(H_PLANTED[j]))


def test_zero_epsilon_gives_zero_kl_and_model_untouched(planted):
    lake = planted["lake"]
    pid = run_perturbation(
        lake, planted["dense"], components=[1], epsilon=0, n_top=5, n_baseline=7, progress=False
    )
    ds = lake.open(pid)
    np.testing.assert_array_equal(ds["kl_top"].values, np.zeros((1, 2)))
    np.testing.assert_array_equal(ds["kl_baseline"].values, np.zeros((1, 2)))
    assert np.isnan(ds["kl_ratio"].values).all()  # 0 / 0
    np.testing.assert_array_equal(
        ds["accuracy_top"].values[0], ds["accuracy_top_original"].values[0]
    )
    assert ds["component"].values.tolist() == [1] and ds["top_example"].shape == (1, 5)
    checkpoint = lake.group(planted["pefs"]).attrs["checkpoint"]
    model, _ = downstream._eval_model(lake.url, planted["run"], checkpoint, "float64", "cpu")
    theta = lake.group(planted["run"])["theta"][checkpoint]
    np.testing.assert_array_equal(flatten_parameters(model), theta)


def test_perturbation_is_seeded_batch_invariant_and_resumes(planted, monkeypatch):
    lake = planted["lake"]
    options = {"epsilon": 0.5, "n_top": 10, "n_baseline": 30, "seed": 3, "progress": False}
    calls = []
    real = downstream._perturb_task

    def failing(*args):
        calls.append(args[2])
        if args[2] == 1 and len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args)

    monkeypatch.setattr(downstream, "_perturb_task", failing)
    with pytest.raises(RuntimeError, match="killed"):
        run_perturbation(lake, planted["dense"], **options)
    resumed = run_perturbation(lake, planted["dense"], **options)
    assert calls == [0, 1, 1]  # the rerun computed only the missing component
    monkeypatch.setattr(downstream, "_perturb_task", real)
    fresh = lake.open(
        run_perturbation(lake, planted["csr"], batch_size=7, **options)
    )  # other artifact, other batch size
    ds = lake.open(resumed)
    np.testing.assert_array_equal(ds["baseline_example"].values, fresh["baseline_example"].values)
    np.testing.assert_allclose(ds["kl_top"].values, fresh["kl_top"].values, rtol=1e-12)
    np.testing.assert_allclose(ds["kl_baseline"].values, fresh["kl_baseline"].values, rtol=1e-12)
    other_seed = lake.open(run_perturbation(lake, planted["dense"], **{**options, "seed": 4}))
    assert not np.array_equal(other_seed["baseline_example"].values, ds["baseline_example"].values)


def test_perturbation_input_validation(planted):
    lake, npeff_id = planted["lake"], planted["dense"]
    cases = [
        ({"components": [5]}, "component"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"epsilon": "big"}, "epsilon"),
        ({"n_top": 0}, "n_top"),
        ({"n_top": N}, "n_top"),
        ({"n_top": 10, "n_baseline": N - 9}, "n_baseline"),
        ({"n_baseline": 0}, "n_baseline"),
        ({"seed": -1}, "seed"),
        ({"dtype": "float16"}, "dtype"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_abs_cos": 1.5}, "max_abs_cos"),
        ({"max_abs_cos": True}, "max_abs_cos"),
    ]
    for kwargs, match in cases:
        with pytest.raises(UserInputError, match=match):
            run_perturbation(lake, npeff_id, progress=False, **kwargs)
    with pytest.raises(UserInputError, match="not a npeff"):
        run_perturbation(lake, planted["run"])
    orphan = lake.begin("npeff", {"orphan": True})
    for name, value in lake.open(npeff_id).variables.items():
        orphan.write(name, value.values)
    attrs = {k: v for k, v in lake.open(npeff_id).attrs.items() if not k.startswith("curvlake")}
    orphan.set_attrs(**{**attrs, "pefs": None})
    orphan_id = orphan.commit()
    with pytest.raises(UserInputError, match="names no pefs"):
        run_perturbation(lake, orphan_id)
    assert top_examples_table(lake, orphan_id, n_top=1)  # top examples need no inputs


def test_end_to_end_through_fit(planted):
    from curvlake.pipelines.npeff.fit import run_npeff_fit

    lake = planted["lake"]
    npeff_id = run_npeff_fit(
        lake, planted["pefs"], n_components=2, max_iter=10, block_size=8, progress=False
    )
    pid = run_perturbation(lake, npeff_id, epsilon=1.0, n_top=N_A, n_baseline=50, progress=False)
    ds = lake.open(pid)
    assert ds["kl_top"].shape == (2, 2) and np.isfinite(ds["kl_top"].values).all()
    assert (ds["kl_top"].values >= 0).all() and (ds["kl_baseline"].values >= 0).all()
    assert len(top_examples_table(lake, npeff_id, n_top=4)) == 8


# -- isolated directions ---------------------------------------------------------------------


def test_isolation_is_the_orthogonal_projection():
    rng = np.random.default_rng(5)
    H = rng.standard_normal((6, 9))
    H[4] = H[0] + 0.1 * H[1]  # close to component 0: left in for small thresholds
    H[5] = 0  # a zero row
    gram = H @ H.T
    norms = np.linalg.norm(H, axis=1)
    for tau in (0.0, 0.3, 0.9, 1.0):
        for j in range(5):
            c = isolation_coefficients(gram, j, tau)
            with np.errstate(invalid="ignore", divide="ignore"):
                cos = np.abs(gram[:, j]) / (norms * norms[j])
            S = [i for i in range(6) if i != j and not cos[i] > tau]
            # oracle: h_j minus its projection on an orthonormal basis of span{h_i : i in S}
            basis = np.linalg.svd(H[S].T, full_matrices=False)[0] if S else np.zeros((9, 0))
            basis = basis[:, : np.linalg.matrix_rank(H[S])] if S else basis
            expected = H[j] - basis @ (basis.T @ H[j])
            np.testing.assert_allclose(c @ H, expected, atol=1e-12)
            assert c[j] == 1 and all(c[i] == 0 for i in range(6) if i not in S and i != j)
            assert c @ gram @ c == pytest.approx(expected @ expected, abs=1e-12)
            for i in S:
                assert abs((c @ H) @ H[i]) < 1e-10
    np.testing.assert_array_equal(isolation_coefficients(gram, 5, 1.0), np.eye(6)[5])


def test_component_gram_of_every_format(planted):
    lake = planted["lake"]
    H = {"dense": H_PLANTED, "csr": H_PLANTED, "lowrank": H_PLANTED * [[1], [-1]]}
    for fmt, rows in H.items():
        gram = component_gram(lake, planted[fmt])
        np.testing.assert_allclose(gram, rows @ rows.T, rtol=1e-6)


def test_isolated_direction_perturbation(planted):
    lake, pefs_id = planted["lake"], planted["pefs"]
    options = {"epsilon": 1.0, "n_top": N_A, "n_baseline": 100, "progress": False}
    plain = lake.open(run_perturbation(lake, planted["dense"], **options))
    # component 1 overlaps component 0 (cos 0.71); isolated, it is exactly planted component 1
    overlapping = np.array([H_PLANTED[0], H_PLANTED[0] + H_PLANTED[1]])
    for fmt in ("dense", "csr", "lowrank"):
        npeff_id = _write_npeff(lake, pefs_id, fmt, overlapping)
        isolated = lake.open(run_perturbation(lake, npeff_id, max_abs_cos=1.0, **options))
        np.testing.assert_allclose(
            isolated["kl_top"].values[1], plain["kl_top"].values[1], rtol=1e-10
        )
        np.testing.assert_allclose(
            isolated["kl_baseline"].values[1], plain["kl_baseline"].values[1], rtol=1e-10
        )
        assert isolated["n_projected"].values.tolist() == [1, 1]
        assert isolated.attrs["max_abs_cos"] == 1.0
        # a threshold below their cosine leaves the directions as they are
        kept = lake.open(run_perturbation(lake, npeff_id, max_abs_cos=0.5, **options))
        untouched = lake.open(run_perturbation(lake, npeff_id, **options))
        np.testing.assert_allclose(kept["kl_top"].values, untouched["kl_top"].values, rtol=1e-12)
        assert kept["n_projected"].values.tolist() == [0, 0]
        assert untouched.attrs["max_abs_cos"] is None and "n_projected" not in untouched
    # a component in the span of the others has nothing left to move along
    parallel = _write_npeff(lake, pefs_id, "dense", np.array([H_PLANTED[0], 2 * H_PLANTED[0]]))
    with pytest.raises(UserInputError, match="component 0 lies in the span"):
        run_perturbation(lake, parallel, max_abs_cos=1.0, **options)
