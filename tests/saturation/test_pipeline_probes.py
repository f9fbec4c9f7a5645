"""``run_probes``: scikit-learn's optimum out of core, invariance, resume by layer, refusals."""

from typing import ClassVar

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.pipelines.saturation import probes_pipeline
from curvlake.pipelines.saturation.import_phdlab import import_phdlab_latents
from curvlake.pipelines.saturation.latents import run_latents
from curvlake.pipelines.saturation.probes_pipeline import DiagonalMoments, run_probes
from tests.pipelines.contract import PipelineContract
from tests.saturation.pipeline_cases import planted_latents, train_tiny_cnn, write_phdlab_latents

TIGHT = {"tol": 1e-10, "max_iter": 1000}


def planted(lake, tmp_path, **kwargs) -> str:
    folder = write_phdlab_latents(tmp_path / "latents", planted_latents(**kwargs))
    return import_phdlab_latents(lake, folder, block_size=16)


class TestProbesContract(PipelineContract):
    module = probes_pipeline
    arrays = ("coef", "intercept", "train_accuracy", "val_accuracy", "test_accuracy")
    block_sizes = (7, 32)
    rtol = 1e-6  # the same optimum, reached through sums in another grouping
    bad_options: ClassVar = [
        ({"C": 0}, r"C=0 is not valid"),
        ({"val_fraction": 1.0}, r"val_fraction=1.0 is not valid"),
        ({"layers": "^nothing$"}, r"matches no layer of the latents \(known: conv1, fc\)"),
        ({"layers": "("}, r"is not a regular expression"),
        ({"max_iter": 0}, r"max_iter=0 is not valid"),
        ({"block_size": 0}, r"block_size=0 is not valid"),
        ({"tol": -1.0}, r"tol=-1.0 is not valid"),
    ]

    def make_inputs(self, lake):
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as scratch:
            return {"latents": planted(lake, Path(scratch), n_train=60, n_test=20)}

    def run(self, lake, inputs, **options):
        options = {"block_size": 16, "tol": 1e-6, "max_iter": 200, **options}
        return run_probes(lake, inputs["latents"], progress=False, **options)

    def _assert_same(self, a, b):
        for name in self.arrays:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-7, err_msg=name)


def _sklearn(x_fit, y_fit, C):
    x_fit = np.asarray(x_fit, dtype=np.float64)  # float32 would make sklearn fit in float32
    scaler = StandardScaler().fit(x_fit)
    model = LogisticRegression(C=C, **TIGHT).fit(scaler.transform(x_fit), y_fit)
    return scaler, model


@pytest.fixture(scope="module")
def cnn_latents(tmp_path_factory):
    lake = open_lake(tmp_path_factory.mktemp("cnn") / "lake", create=True)
    run_id = train_tiny_cnn(lake)
    return lake, run_latents(lake, run_id, pool=1, n_examples=240, block_size=64, progress=False)


@pytest.mark.parametrize("C", [1.0, 0.05])
def test_same_optimum_and_accuracies_as_sklearn_on_cnn_latents(cnn_latents, C):
    lake, latents_id = cnn_latents
    latents = lake.open(latents_id)
    probes = lake.open(run_probes(lake, latents_id, C=C, val_fraction=0.2, **TIGHT, progress=False))
    n = latents.sizes["train_example"]
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(0).permutation(n)[: round(0.2 * n)]] = True
    x, y = latents.train_features.values, latents.train_label.values
    for i, name in enumerate(probes.layer.values):
        start, width = int(latents.feature_offset[i]), int(latents.n_features[i])
        assert latents.layer.values[i] == name
        columns = slice(start, start + width)
        scaler, model = _sklearn(x[~held, columns], y[~held], C)
        ours = probes.coef.values[:, int(probes.feature_offset[i]) :][:, :width]
        np.testing.assert_allclose(ours, model.coef_, rtol=0, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(probes.intercept.values[i], model.intercept_, atol=1e-4)
        for split, rows, labels in (
            ("train", x[~held, columns], y[~held]),
            ("val", x[held, columns], y[held]),
            ("test", latents.test_features.values[:, columns], latents.test_label.values),
        ):
            expected = model.score(scaler.transform(rows.astype(np.float64)), labels)
            assert probes[f"{split}_accuracy"].values[i] == expected, (name, split)
        assert probes.converged.values[i]


def test_two_classes_give_sklearns_binomial_probe(tmp_path):
    lake = open_lake(tmp_path / "lake", create=True)
    latents = planted(lake, tmp_path, classes=2)
    probes = lake.open(run_probes(lake, latents, val_fraction=0, **TIGHT, progress=False))
    ds = lake.open(latents)
    x, y = ds.train_features.values, ds.train_label.values
    assert probes.coef.shape[0] == 1
    for i in range(2):
        start, width = int(ds.feature_offset[i]), int(ds.n_features[i])
        _, model = _sklearn(x[:, start : start + width], y, 1.0)
        coef = probes.coef.values[:, int(probes.feature_offset[i]) :][:, :width]
        np.testing.assert_allclose(coef, model.coef_, atol=1e-4)
    assert np.isnan(probes.val_accuracy.values).all()


def test_separable_classes_are_learned_and_shuffled_labels_are_not(tmp_path):
    lake = open_lake(tmp_path / "lake", create=True)
    data = planted_latents(n_train=200, n_test=100)
    for split in data.values():  # separable: the first features are the one-hot label
        split["conv1"][:, :3] += 30 * np.eye(3)[split["labels"]]
    folder = write_phdlab_latents(tmp_path / "separable", data)
    separable = lake.open(run_probes(lake, import_phdlab_latents(lake, folder), progress=False))
    assert separable.test_accuracy.values[0] == 1.0
    rng = np.random.default_rng(1)
    for split in data.values():
        split["labels"] = rng.permutation(split["labels"])
    folder = write_phdlab_latents(tmp_path / "shuffled", data)
    shuffled = lake.open(run_probes(lake, import_phdlab_latents(lake, folder), progress=False))
    assert abs(shuffled.test_accuracy.values[0] - 1 / 3) < 0.15


def test_val_split_of_the_latents_is_used_and_val_fraction_refused(tmp_path):
    lake = open_lake(tmp_path / "lake", create=True)
    run_id = train_tiny_cnn(lake)
    latents = run_latents(
        lake, run_id, splits=["train", "val"], pool=1, n_examples=80, progress=False
    )
    with pytest.raises(UserInputError, match="val_fraction does not apply to latents with a val"):
        run_probes(lake, latents, val_fraction=0.1, progress=False)
    probes = lake.open(run_probes(lake, latents, layers="fc", progress=False))
    assert list(probes.layer.values) == ["fc"] and probes.attrs["validation"] == "val split"
    assert np.isnan(probes.test_accuracy.values).all()
    assert np.isfinite(probes.val_accuracy.values).all()
    with pytest.raises(UserInputError, match="not a latents"):
        run_probes(lake, run_id, progress=False)


class _Killed(Exception):
    pass


def test_killed_fit_refits_only_the_layers_not_stored(tmp_path, monkeypatch):
    lake = open_lake(tmp_path / "lake", create=True)
    latents = planted(lake, tmp_path)
    fresh_lake = open_lake(tmp_path / "fresh", create=True)
    fresh = fresh_lake.open(
        run_probes(fresh_lake, planted(fresh_lake, tmp_path / "b"), **TIGHT, progress=False)
    )
    real = probes_pipeline.run_tasks
    requested: list[set] = []

    def recording(kill_at=None):
        def run_tasks(function, tasks, **kwargs):
            if kwargs.get("description") == "probe pass":
                requested.append({layer.name for layer, _ in tasks[0][4]["requests"]})
                if len(requested) == kill_at:
                    raise _Killed
            return real(function, tasks, **kwargs)

        return run_tasks

    first_done = int(fresh.n_evaluations.values.min())  # its last pass; later ones skip it
    assert first_done < int(fresh.n_evaluations.values.max())
    monkeypatch.setattr(probes_pipeline, "run_tasks", recording(kill_at=first_done + 2))
    with pytest.raises(_Killed):
        run_probes(lake, latents, **TIGHT, progress=False)
    assert requested[0] == {"conv1", "fc"}
    stored = {"conv1", "fc"} - requested[-1]
    assert stored, "pick a kill after the first layer converged"
    requested.clear()
    monkeypatch.setattr(probes_pipeline, "run_tasks", recording())
    resumed = lake.open(run_probes(lake, latents, **TIGHT, progress=False))
    assert all(not (stored & layers) for layers in requested)  # stored layers are not refit
    for name in ("coef", "intercept", "test_accuracy", "n_iter"):
        np.testing.assert_array_equal(resumed[name].values, fresh[name].values, err_msg=name)


def test_a_cluster_fits_what_this_process_fits(tmp_path):
    from curvlake.engine import client_session

    lake = open_lake(tmp_path / "lake", create=True)
    latents = planted(lake, tmp_path, n_train=60, n_test=20)
    here = lake.open(run_probes(lake, latents, tol=1e-6, progress=False))
    with client_session(cluster="local", n_workers=1, threads_per_worker=1, processes=False):
        there = lake.open(run_probes(lake, latents, tol=1e-6, C=1.0 + 1e-15, progress=False))
    for name in ("coef", "intercept", "n_iter", "test_accuracy"):  # C=1 + 1e-15: a new id
        np.testing.assert_allclose(there[name].values, here[name].values, atol=1e-9, err_msg=name)


def test_diagonal_moments_merge_like_np_var():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)) + 1e6
    merged = DiagonalMoments.from_batch(x[:13]).merge(DiagonalMoments.from_batch(x[13:]))
    np.testing.assert_allclose(merged.variance(0), x.var(axis=0), rtol=1e-8)
    np.testing.assert_allclose(merged.mean, x.mean(axis=0), rtol=1e-14)
