import json

import pytest

from curvlake.errors import UserInputError
from curvlake.nn.grids import MODEL_LIST_PARAMS, expand_grid, expand_train_grid, load_grid

KEYS = ("a", "b", "c", "params", "saves")


def test_cartesian_product_in_spec_order_first_key_slowest():
    points = expand_grid({"a": [1, 2], "b": "x", "c": [True, False]}, KEYS)
    assert points == [
        {"a": 1, "b": "x", "c": True},
        {"a": 1, "b": "x", "c": False},
        {"a": 2, "b": "x", "c": True},
        {"a": 2, "b": "x", "c": False},
    ]
    assert expand_grid({"a": 3}, KEYS) == [{"a": 3}]


def test_nested_mapping_expands_inside():
    points = expand_grid({"a": [1, 2], "params": {"k": [1, 4], "bn": False}}, KEYS)
    assert [(p["a"], p["params"]) for p in points] == [
        (1, {"k": 1, "bn": False}),
        (1, {"k": 4, "bn": False}),
        (2, {"k": 1, "bn": False}),
        (2, {"k": 4, "bn": False}),
    ]
    # a list of mappings is a list of choices, each expanded
    points = expand_grid({"params": [{"k": [1, 2]}, {"w": 3}]}, KEYS)
    assert [p["params"] for p in points] == [{"k": 1}, {"k": 2}, {"w": 3}]


def test_list_valued_keys_flat_list_is_one_value_list_of_lists_expands():
    kw = {"list_valued_keys": ["saves"], "nested_list_valued_keys": {"params": ["widths"]}}
    assert expand_grid({"saves": [1, 5]}, KEYS, **kw) == [{"saves": [1, 5]}]
    assert expand_grid({"saves": [[1], [2, 3]]}, KEYS, **kw) == [{"saves": [1]}, {"saves": [2, 3]}]
    assert expand_grid({"saves": []}, KEYS, **kw) == [{"saves": []}]
    one = expand_grid({"params": {"widths": [64, 64]}}, KEYS, **kw)
    assert one == [{"params": {"widths": [64, 64]}}]
    two = expand_grid({"params": {"widths": [[64], [64, 64]]}}, KEYS, **kw)
    assert [p["params"]["widths"] for p in two] == [[64], [64, 64]]
    # without the declaration a flat list is a list of choices
    assert len(expand_grid({"saves": [1, 5]}, KEYS)) == 2


def test_unknown_and_malformed_specs():
    with pytest.raises(UserInputError, match=r"'lr'.*allowed keys: a, b, c, params, saves"):
        expand_grid({"a": 1, "lr": [0.1]}, KEYS)
    with pytest.raises(UserInputError, match="empty list"):
        expand_grid({"a": []}, KEYS)
    with pytest.raises(UserInputError, match="mapping"):
        expand_grid(3, KEYS)
    assert expand_grid([{"a": [1, 2]}, {"b": 0}], KEYS) == [{"a": 1}, {"a": 2}, {"b": 0}]


def test_expand_train_grid_builds_valid_configs():
    assert "widths" in MODEL_LIST_PARAMS
    configs = expand_train_grid(
        {
            "model": "mlp",
            "model_params": {"widths": [[32], [32, 32]], "activation": ["relu", "tanh"]},
            "lr": [0.1, 0.01],
            "save_epochs": [1, 2],
            "epochs": 3,
        }
    )
    assert len(configs) == 8
    assert configs[0].model_params == {"widths": [32], "activation": "relu"}
    assert configs[-1].model_params == {"widths": [32, 32], "activation": "tanh"}
    assert [c.lr for c in configs[:2]] == [0.1, 0.01]
    assert all(c.save_epochs == (1, 2) for c in configs)


def test_expand_train_grid_rejects_unknown_options_and_bad_points():
    with pytest.raises(UserInputError, match=r"'learning_rate'.*allowed keys: model"):
        expand_train_grid({"learning_rate": [0.1]})
    with pytest.raises(UserInputError, match=r"grid point 1 .*'k'"):
        expand_train_grid({"model": ["cnn5_k", "mlp"], "model_params": {"k": 4}})
    # pairing each model with its own parameters: a list of specs
    configs = expand_train_grid(
        [{"model": "cnn5_k", "model_params": {"k": [1, 2]}}, {"model": "mlp"}]
    )
    assert [(c.model, c.model_params) for c in configs] == [
        ("cnn5_k", {"k": 1}),
        ("cnn5_k", {"k": 2}),
        ("mlp", {}),
    ]


def test_load_grid_yaml_and_json(tmp_path):
    (tmp_path / "g.yaml").write_text(
        "model: resnet18_k\nmodel_params:\n  k: [1, 2, 4]\nlabel_noise: [0.1, 0.2]\n"
        "warmup_start_lr: 1e-3\n"
    )
    spec = load_grid(tmp_path / "g.yaml")
    configs = expand_train_grid(spec)
    assert len(configs) == 6
    assert configs[0].warmup_start_lr == 0.001  # YAML reads 1e-3 as a string
    (tmp_path / "g.json").write_text(json.dumps({"lr": [0.1, 0.2]}))
    assert len(expand_train_grid(load_grid(tmp_path / "g.json"))) == 2
    (tmp_path / "g.toml").write_text("lr = 1")
    with pytest.raises(UserInputError, match=r"\.yaml, \.yml or \.json"):
        load_grid(tmp_path / "g.toml")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(UserInputError, match="cannot parse"):
        load_grid(tmp_path / "bad.json")
    (tmp_path / "scalar.yaml").write_text("3")
    with pytest.raises(UserInputError, match="mapping"):
        load_grid(tmp_path / "scalar.yaml")
    with pytest.raises(UserInputError, match="no such"):
        load_grid(tmp_path / "missing.yaml")
