"""Parameter masks: magnitude masks against an argsort oracle, file formats, set algebra."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from curvlake.errors import UserInputError
from curvlake.nn.masks import ParameterMask, magnitude_counts
from curvlake.nn.params import LayerTable, flatten_parameters, parameter_table


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


@pytest.fixture
def table():
    return parameter_table(_model())  # 0.weight (4,5), 0.bias (4,), 2.weight (3,4), 2.bias (3,)


@pytest.fixture
def theta(table):
    # few distinct magnitudes, so ties are everywhere
    return np.random.default_rng(0).integers(-3, 4, table.total).astype(np.float32)


def _oracle_top(theta, coordinates, m):
    """The m largest |theta| among ``coordinates`` by a full sort, ties to the lower index."""
    coordinates = np.asarray(coordinates)
    order = np.lexsort((coordinates, -np.abs(theta[coordinates].astype(np.float64))))
    return np.sort(coordinates[order[:m]])


def _coordinates(table, names):
    return np.concatenate([np.arange(table.total)[table.slice_of(n)] for n in names])


# -- magnitude ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 7, 20, 39])
@pytest.mark.parametrize("layers", [None, "weight", r"^2\."])
def test_global_magnitude_matches_a_full_sort(table, theta, size, layers):
    names = [table.names[i] for i in table.select(layers)]
    coordinates = _coordinates(table, names)
    size = min(size, coordinates.size)
    mask = ParameterMask.magnitude(theta, table, size=size, layers=layers)
    np.testing.assert_array_equal(mask.indices, _oracle_top(theta, coordinates, size))
    assert mask.indices.dtype == np.int64 and len(mask) == size


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_global_fraction_rounds_the_selected_count(table, theta, fraction):
    mask = ParameterMask.magnitude(theta, table, fraction=fraction)
    m = round(fraction * table.total)
    np.testing.assert_array_equal(mask.indices, _oracle_top(theta, np.arange(table.total), m))


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("layers", [None, "bias"])
def test_layer_scope_keeps_each_tensors_share(table, theta, fraction, layers):
    mask = ParameterMask.magnitude(theta, table, fraction=fraction, scope="layer", layers=layers)
    selected = set(table.select(layers))
    expected = []
    for i, name in enumerate(table.names):
        if i in selected:
            m = round(fraction * int(table.sizes[i]))
            expected.append(_oracle_top(theta, _coordinates(table, [name]), m))
    np.testing.assert_array_equal(mask.indices, np.sort(np.concatenate(expected)))


def test_layer_scope_splits_a_size_by_largest_remainders(table, theta):
    # sizes 20, 4, 12, 3 (N = 39); M = 10: quotas 5.13, 1.03, 3.08, 0.77 -> floors 5, 1, 3, 0
    # and the one left over goes to the largest remainder (2.bias)
    mask = ParameterMask.magnitude(theta, table, size=10, scope="layer")
    np.testing.assert_array_equal(mask.count_per_layer(), [5, 1, 3, 1])
    for total in range(table.total + 1):
        counts, _ = magnitude_counts(table, size=total, scope="layer")
        assert sum(counts) == total and (np.array(counts) <= table.sizes).all()
    expected = [
        _oracle_top(theta, _coordinates(table, [name]), m)
        for name, m in zip(table.names, [5, 1, 3, 1], strict=True)
    ]
    np.testing.assert_array_equal(mask.indices, np.concatenate(expected))


def test_ties_go_to_the_lower_index(table):
    theta = np.ones(table.total, np.float32)
    theta[[3, 30]] = -2.0
    mask = ParameterMask.magnitude(theta, table, size=5)
    np.testing.assert_array_equal(mask.indices, [0, 1, 2, 3, 30])
    layer = ParameterMask.magnitude(theta, table, fraction=0.5, scope="layer")
    assert list(layer.indices[:10]) == list(range(10))  # 0.weight: its first half, 3 included


def test_magnitude_accepts_torch_and_is_deterministic(table, theta):
    a = ParameterMask.magnitude(torch.from_numpy(theta), table, size=11)
    b = ParameterMask.magnitude(theta.astype(np.float64), table, size=11)
    assert a == b


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of size and fraction"),
        ({"size": 3, "fraction": 0.1}, "exactly one of size and fraction"),
        ({"size": 40}, r"size=40 must lie in \[0, 39\]"),
        ({"size": 16, "layers": "^2"}, r"size=16 must lie in \[0, 15\]"),
        ({"size": -1}, "size=-1"),
        ({"size": 2.5}, "size=2.5 must be an integer"),
        ({"fraction": 1.5}, r"fraction=1.5 must be a number in \[0, 1\]"),
        ({"fraction": float("nan")}, "fraction=nan"),
        ({"size": 3, "scope": "tensor"}, "scope='tensor' is not valid: must be one of global"),
        ({"size": 3, "layers": "conv"}, "layer pattern 'conv' matches none"),
        ({"size": 3, "layers": "("}, "not a regular expression"),
    ],
)
def test_magnitude_refuses_bad_options(table, theta, options, message):
    with pytest.raises(UserInputError, match=message):
        ParameterMask.magnitude(theta, table, **options)


def test_magnitude_refuses_a_wrong_theta(table, theta):
    with pytest.raises(UserInputError, match=r"theta must have shape \(39,\)"):
        ParameterMask.magnitude(theta[:-1], table, size=1)
    theta = theta.copy()
    theta[0] = np.nan
    with pytest.raises(UserInputError, match="NaN"):
        ParameterMask.magnitude(theta, table, size=1)


# -- constructors from coordinates and files ----------------------------------------------------


def test_from_indices_sorts_and_deduplicates(table):
    mask = ParameterMask.from_indices(table, [7, 2, 7, 38])
    np.testing.assert_array_equal(mask.indices, [2, 7, 38])
    assert not mask.indices.flags.writeable
    assert len(ParameterMask.from_indices(table, [])) == 0
    for bad, message in (([39], r"\[0, 39\)"), ([-1], r"\[0, 39\)"), ([1.0], "integers")):
        with pytest.raises(UserInputError, match=message):
            ParameterMask.from_indices(table, bad)
    with pytest.raises(UserInputError, match="from_bool"):
        ParameterMask.from_indices(table, np.ones(39, bool))
    with pytest.raises(UserInputError, match="sorted and unique"):
        ParameterMask(table, np.array([3, 1]))


def test_from_bool_round_trips(table):
    vector = np.random.default_rng(1).random(table.total) < 0.3
    mask = ParameterMask.from_bool(table, vector)
    np.testing.assert_array_equal(mask.to_bool(), vector)
    np.testing.assert_array_equal(mask.indices, np.flatnonzero(vector))
    assert ParameterMask.from_bool(table, torch.from_numpy(vector)) == mask
    with pytest.raises(UserInputError, match=r"shape \(39,\)"):
        ParameterMask.from_bool(table, vector[:-1])
    with pytest.raises(UserInputError, match="dtype bool"):
        ParameterMask.from_bool(table, vector.astype(np.int8))


def test_from_file_npy_bool_and_indices(tmp_path, table):
    vector = np.zeros(table.total, bool)
    vector[[0, 5, 38]] = True
    np.save(tmp_path / "bool.npy", vector)
    np.save(tmp_path / "index.npy", np.array([38, 0, 5], np.int32))
    expected = ParameterMask.from_indices(table, [0, 5, 38])
    assert ParameterMask.from_file(tmp_path / "bool.npy", table) == expected
    assert ParameterMask.from_file(str(tmp_path / "index.npy"), table) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (np.zeros(39, np.float32), "bool .* or integer indices, got dtype float32"),
        (np.zeros((3, 13), bool), r"1-D vector, got shape \(3, 13\)"),
        (np.zeros(12, bool), r"shape \(39,\)"),
        (np.array([40]), r"\[0, 39\)"),
    ],
)
def test_from_file_npy_refuses_bad_content(tmp_path, table, content, message):
    np.save(tmp_path / "m.npy", content)
    with pytest.raises(UserInputError, match=message):
        ParameterMask.from_file(tmp_path / "m.npy", table)


def test_from_file_pt_dict_of_tensor_masks(tmp_path, table):
    masks = {"0.bias": torch.tensor([True, False, False, True]), "2.weight": torch.zeros(3, 4)}
    masks["2.weight"][1, 2] = 1.0
    torch.save(masks, tmp_path / "m.pt")
    mask = ParameterMask.from_file(tmp_path / "m.pt", table)
    # 0.bias starts at 20, 2.weight at 24: row 1, column 2 is 24 + 4 + 2
    np.testing.assert_array_equal(mask.indices, [20, 23, 30])
    assert ParameterMask.from_tensors(table, mask.to_tensors()) == mask


def test_from_file_reads_torch_prune_masks(tmp_path):
    model = _model()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[2], "bias", amount=0.34)
    buffers = {k: v for k, v in model.state_dict().items() if k.endswith("_mask")}
    assert set(buffers) == {"0.weight_mask", "2.bias_mask"}
    torch.save(buffers, tmp_path / "pruned.pt")
    table = parameter_table(_model())
    mask = ParameterMask.from_file(tmp_path / "pruned.pt", table)
    kept = mask.to_tensors()
    assert torch.equal(kept["0.weight"], buffers["0.weight_mask"].bool())
    assert torch.equal(kept["2.bias"], buffers["2.bias_mask"].bool())
    assert not kept["0.bias"].any() and not kept["2.weight"].any()
    np.testing.assert_array_equal(mask.count_per_layer(), [10, 0, 0, 2])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"fc.weight": torch.ones(2)}, r"'fc.weight' is not a parameter tensor .* 0.weight, "),
        ({"0.bias": torch.ones(5, dtype=torch.bool)}, r"shape \(5,\), tensor '0.bias' has"),
        ({"0.bias": torch.full((4,), 0.5)}, "must be boolean or hold only 0 and 1"),
        (
            {"0.bias": torch.ones(4), "0.bias_mask": torch.ones(4)},
            "tensor '0.bias' is given twice",
        ),
        ({"0.bias": "yes"}, "is a str, not a mask tensor"),
        ([torch.ones(4)], "must hold a dict"),
    ],
)
def test_from_file_pt_refuses_bad_content(tmp_path, table, content, message):
    torch.save(content, tmp_path / "m.pt")
    with pytest.raises(UserInputError, match=message):
        ParameterMask.from_file(tmp_path / "m.pt", table)


def test_from_file_refuses_missing_and_foreign_files(tmp_path, table):
    with pytest.raises(UserInputError, match="no such mask file"):
        ParameterMask.from_file(tmp_path / "none.npy", table)
    (tmp_path / "m.txt").write_text("1 2 3")
    with pytest.raises(UserInputError, match=r"must be \.npy .* or \.pt"):
        ParameterMask.from_file(tmp_path / "m.txt", table)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserInputError, match="not a readable torch file"):
        ParameterMask.from_file(tmp_path / "bad.pt", table)


# -- views and set algebra ----------------------------------------------------------------------


def test_set_operations_match_boolean_algebra(table):
    rng = np.random.default_rng(2)
    a_bool, b_bool = rng.random(table.total) < 0.4, rng.random(table.total) < 0.6
    a, b = ParameterMask.from_bool(table, a_bool), ParameterMask.from_bool(table, b_bool)
    np.testing.assert_array_equal((a & b).to_bool(), a_bool & b_bool)
    np.testing.assert_array_equal((a | b).to_bool(), a_bool | b_bool)
    np.testing.assert_array_equal(a.complement().to_bool(), ~a_bool)
    assert a.complement().complement() == a
    assert a.iou(b) == pytest.approx((a_bool & b_bool).sum() / (a_bool | b_bool).sum())
    assert a.iou(a) == 1.0 and a.iou(a.complement()) == 0.0
    empty = ParameterMask.from_indices(table, [])
    assert empty.iou(empty) == 1.0 and empty.density == 0.0
    assert a.density == pytest.approx(a_bool.mean())
    np.testing.assert_array_equal(
        a.count_per_layer(), [a_bool[table.slice_of(n)].sum() for n in table.names]
    )


def test_masks_of_different_parameter_spaces_do_not_combine(table):
    other = LayerTable(("w",), ((39,),))
    a, b = ParameterMask.from_indices(table, [1]), ParameterMask.from_indices(other, [1])
    assert a != b
    for combine in (lambda: a & b, lambda: a | b, lambda: a.iou(b), lambda: a.check_compatible(b)):
        with pytest.raises(UserInputError, match="different parameter spaces") as error:
            combine()
        assert table.fingerprint in str(error.value) and other.fingerprint in str(error.value)


def test_mask_of_a_models_theta_lines_up_with_its_tensors():
    model = _model()
    table = parameter_table(model)
    mask = ParameterMask.magnitude(flatten_parameters(model), table, size=1, layers="^2.weight$")
    (where,) = mask.indices - table.slice_of("2.weight").start
    weight = model[2].weight.detach().abs().reshape(-1)
    assert where == int(torch.argmax(weight))
