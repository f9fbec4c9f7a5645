import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from curvlake.errors import UserInputError
from curvlake.nn.datasets import Split, load_splits
from curvlake.nn.training import (
    _TRACK_KEYS,
    TrainConfig,
    checkpoint_epochs,
    derive_seed,
    evaluate,
    learning_rate,
    load_training_data,
    make_model,
    make_optimizer,
    train_epochs,
    train_one_epoch,
)


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits", split_seed=0)


@pytest.fixture(scope="module")
def small(digits):
    """digits with a 300-example train split, to keep the multi-epoch tests fast."""
    train = Split(digits.train.x[:300], digits.train.y[:300], digits.train.sample_id[:300])
    return dataclasses.replace(digits, train=train)


# --- config --------------------------------------------------------------------------------


def test_defaults_validate_and_round_trip():
    config = TrainConfig().validate()
    d = config.to_dict()
    json.dumps(d)
    assert TrainConfig.from_dict(d) == config
    # tracking options are left out when nothing is tracked (untracked run ids stay)
    assert list(d) == [k for k in TrainConfig.keys() if k not in _TRACK_KEYS]
    c = TrainConfig.from_dict({"save_epochs": [3, 1], "standardize": True, "lr": "1e-3"})
    assert c.save_epochs == (3, 1) and c.standardize == "train" and c.lr == 0.001
    assert c.to_dict()["save_epochs"] == [3, 1]
    assert c.replace(lr=0.5).lr == 0.5


def test_from_dict_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(
        UserInputError, match=r"'learning_rate'.*valid options: model, model_params"
    ):
        TrainConfig.from_dict({"learning_rate": 0.1})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "resnet"}, "model='resnet'"),
        ({"model": "mlp", "model_params": {"depth": 2}}, "'depth'"),
        ({"dataset": "imagenet"}, "dataset='imagenet'"),
        ({"label_noise": 1.5}, r"label_noise=1.5 \(allowed: a number in \[0, 1\]\)"),
        ({"optimizer": "rmsprop"}, "sgd, adam"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"momentum": 1.0}, "momentum"),
        ({"lr_schedule": "step", "lr_step": 0}, "lr_step >= 1"),
        ({"lr_schedule": "cosine"}, "constant, step"),
        ({"batch_size": 0}, "batch_size"),
        ({"device": "gpu"}, "device='gpu'"),
        ({"epochs": 5, "save_epochs": [2, 6]}, r"save_epochs=\(2, 6\)"),
        ({"seed": -1}, "seed=-1"),
        ({"nesterov": True, "optimizer": "adam"}, "nesterov"),
        ({"standardize": "zscore"}, "standardize"),
    ],
)
def test_validate_rejects_bad_values(changes, message):
    with pytest.raises(UserInputError, match=message):
        TrainConfig(**changes).validate()


def test_validate_reports_every_problem_at_once():
    with pytest.raises(UserInputError) as info:
        TrainConfig(lr=-1.0, batch_size=0).validate()
    assert "lr=-1.0" in str(info.value) and "batch_size=0" in str(info.value)


def test_dataset_may_be_an_npz_path_or_a_lake_id():
    TrainConfig(dataset="data/mine.npz").validate()
    TrainConfig(dataset="dataset-0123456789abcdef").validate()


# --- schedule and checkpoints ------------------------------------------------------------


def test_warmup_matches_the_seed_readme():
    # jacobian.md §3: 0.001 -> 0.005 over 5 epochs, then constant
    config = TrainConfig(lr=0.005, warmup_epochs=5, warmup_start_lr=0.001)
    lrs = [learning_rate(config, e) for e in range(8)]
    np.testing.assert_allclose(lrs, [0.001, 0.002, 0.003, 0.004, 0.005, 0.005, 0.005, 0.005])


def test_step_decay_and_warmup_combine():
    step = TrainConfig(lr=0.1, lr_schedule="step", lr_step=2, lr_gamma=0.5)
    np.testing.assert_allclose(
        [learning_rate(step, e) for e in range(6)], [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    )
    # the seed silently dropped the warmup when lr_step > 0; here both apply
    both = TrainConfig(lr=0.1, lr_schedule="step", lr_step=4, warmup_epochs=3, warmup_start_lr=0.0)
    np.testing.assert_allclose(
        [learning_rate(both, e) for e in range(6)], [0.0, 0.05, 0.1, 0.1, 0.01, 0.01]
    )
    assert learning_rate(TrainConfig(lr=0.3, warmup_epochs=1, warmup_start_lr=0.1), 0) == 0.3


def test_checkpoint_epochs():
    assert checkpoint_epochs(TrainConfig(epochs=10)) == [0, 10]
    assert checkpoint_epochs(TrainConfig(epochs=10, save_every=4)) == [0, 4, 8, 10]
    assert checkpoint_epochs(TrainConfig(epochs=10, save_epochs=(7, 1, 7))) == [0, 1, 7, 10]
    assert checkpoint_epochs(TrainConfig(epochs=6, save_every=3, save_epochs=(1,))) == [0, 1, 3, 6]


def test_derived_seeds_differ_per_stream():
    seeds = {derive_seed(0, s, e) for s in range(3) for e in range(50)}
    assert len(seeds) == 150 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)


# --- the loop ------------------------------------------------------------------------------


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _resume_check(digits, config, build):
    """Train epochs 0..E-1 straight, and 0..k-1 then resume from saved state: bit-equal."""
    model = build()
    optimizer = make_optimizer(model, config)
    pad = digits.pad_value
    train_epochs(model, optimizer, digits.train, config, pad_value=pad)
    straight = _params(model)

    model = build()
    optimizer = make_optimizer(model, config)
    for epoch in range(2):
        train_one_epoch(
            model, optimizer, digits.train.x, digits.train.y, config, epoch, pad_value=pad
        )
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    del model, optimizer

    torch.manual_seed(12345)  # the resuming process has another global RNG state
    resumed = build()
    resumed.load_state_dict(saved_model)
    optimizer = make_optimizer(resumed, config)
    optimizer.load_state_dict(saved_optimizer)
    train_epochs(resumed, optimizer, digits.train, config, start_epoch=2, pad_value=pad)
    _assert_same_state(straight, _params(resumed))


def test_resume_is_bit_exact_with_batchnorm_augmentation_and_momentum(small):
    config = TrainConfig(
        model="cnn5_k",
        model_params={"k": 2, "batch_norm": True},
        epochs=3,
        batch_size=64,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        warmup_epochs=2,
        warmup_start_lr=0.01,
        augment=True,
        augment_padding=2,
        device="cpu",
        seed=3,
    ).validate()
    build = lambda: make_model(config, num_classes=10, input_shape=small.input_shape)  # noqa: E731
    _resume_check(small, config, build)


def test_resume_is_bit_exact_with_dropout_and_adam(small):
    config = TrainConfig(optimizer="adam", lr=1e-3, epochs=3, batch_size=100, device="cpu", seed=1)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)
        )

    _resume_check(small, config, build)


def test_epoch_is_deterministic_and_leaves_global_rng_alone(small):
    config = TrainConfig(epochs=1, batch_size=64, device="cpu", augment=True, seed=5)
    states = []
    for _ in range(2):
        model = make_model(config, num_classes=10, input_shape=small.input_shape)
        optimizer = make_optimizer(model, config)
        before = torch.get_rng_state()
        stats = train_one_epoch(model, optimizer, small.train.x, small.train.y, config, 0)
        assert torch.equal(before, torch.get_rng_state())
        states.append(_params(model))
    _assert_same_state(*states)
    assert set(stats) == {"loss", "accuracy", "lr"} and 0 <= stats["accuracy"] <= 1
    other = config.replace(seed=6)
    model = make_model(other, num_classes=10, input_shape=small.input_shape)
    train_one_epoch(model, make_optimizer(model, other), small.train.x, small.train.y, other, 0)
    assert not torch.equal(_params(model)["fc1.weight"], states[0]["fc1.weight"])


def test_train_one_epoch_sets_the_scheduled_lr_and_calls_back(digits):
    config = TrainConfig(lr=0.005, warmup_epochs=5, warmup_start_lr=0.001, batch_size=500)
    model = make_model(config, num_classes=10, input_shape=digits.input_shape)
    optimizer = make_optimizer(model, config)
    calls = []
    stats = train_one_epoch(
        model,
        optimizer,
        digits.train.x,
        digits.train.y,
        config,
        2,
        "cpu",
        callback=lambda b, n, loss: calls.append((b, n, loss)),
    )
    assert stats["lr"] == pytest.approx(0.003)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.003)
    assert [(b, n) for b, n, _ in calls] == [(0, 3), (1, 3), (2, 3)]


def test_training_learns_digits(digits):
    config = TrainConfig(epochs=5, lr=0.1, batch_size=64, device="cpu")
    model = make_model(config, num_classes=10, input_shape=digits.input_shape)
    seen = []
    history = train_epochs(
        model,
        make_optimizer(model, config),
        digits.train,
        config,
        eval_splits={"val": digits.val},
        on_epoch_end=lambda e, m: seen.append(e),
    )
    assert seen == [1, 2, 3, 4, 5] and [h["epoch"] for h in history] == seen
    assert history[-1]["val_accuracy"] > 0.9
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_evaluate_matches_a_direct_computation(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    model.train()
    result = evaluate(model, digits.test.x, digits.test.y, batch_size=50)
    with torch.no_grad():
        logits = model(torch.from_numpy(digits.test.x))
        labels = torch.from_numpy(digits.test.y)
        loss = nn.functional.cross_entropy(logits.double(), labels).item()
        accuracy = (logits.argmax(1) == labels).double().mean().item()
    assert result["loss"] == pytest.approx(loss, rel=1e-6)
    assert result["accuracy"] == pytest.approx(accuracy)
    assert model.training  # mode restored
    assert np.isnan(evaluate(model, digits.test.x[:0], digits.test.y[:0])["loss"])


def test_make_model_is_seeded_by_the_config():
    config = TrainConfig(seed=4)
    a = make_model(config, num_classes=10, input_shape=(1, 8, 8))
    b = make_model(config, num_classes=10, input_shape=(1, 8, 8))
    _assert_same_state(a.state_dict(), b.state_dict())
    c = make_model(config.replace(seed=5), num_classes=10, input_shape=(1, 8, 8))
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_load_training_data_applies_label_noise_to_train_only():
    config = TrainConfig(label_noise=0.2, label_seed=7)
    splits, clean = load_training_data(config)
    reference = load_splits("digits")
    np.testing.assert_array_equal(clean, reference.train.y)
    assert (splits.train.y != clean).sum() == round(0.2 * len(clean))
    np.testing.assert_array_equal(splits.val.y, reference.val.y)
    np.testing.assert_array_equal(splits.test.y, reference.test.y)
    with pytest.raises(UserInputError, match="lake"):
        load_training_data(TrainConfig(dataset="dataset-0123456789abcdef"))
