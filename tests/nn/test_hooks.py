"""The layer recorder: feature layers, recorded phases, and no effect on training."""

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from curvlake.errors import UserInputError
from curvlake.nn.datasets import Split, load_splits
from curvlake.nn.hooks import Recorder, attach, feature_layers
from curvlake.nn.models import build_model
from curvlake.nn.params import flatten_parameters
from curvlake.nn.training import (
    TrainConfig,
    evaluate,
    make_model,
    make_optimizer,
    train_epochs,
)


class Log(Recorder):
    """Every call, in order: ``(event, epoch)`` or ``(phase, layer, batch size)``."""

    def __init__(self, layers=None):
        self.layers = layers
        self.events = []
        self.features = {}

    def start_epoch(self, epoch):
        self.events.append(("start", epoch))

    def record(self, layer, features, phase):
        assert not features.requires_grad and torch.is_grad_enabled() is False
        self.events.append((phase, layer, features.shape[0]))
        self.features[layer] = features.clone()

    def end_epoch(self, epoch):
        self.events.append(("end", epoch))


class Busy(Recorder):
    """Does real work on every call (and keeps copies), to show it changes nothing."""

    def __init__(self):
        self.sums = []

    def record(self, layer, features, phase):
        self.sums.append((features.double() ** 2).sum().item())


class TinyLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(input_size=3, hidden_size=4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _resnet_blocks():
    for stage in range(1, 5):
        for block in range(2):
            shortcut = ("downsample",) if stage > 1 and block == 0 else ()
            for conv in ("conv1", "conv2", *shortcut):
                yield f"layer{stage}.{block}.{conv}"


def _zoo(name, **params):
    torch.manual_seed(0)
    shape = (1, 8, 8) if name == "mlp" else (3, 8, 8)
    return build_model(name, num_classes=3, input_shape=shape, **params), shape


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


# -- feature layers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("mlp", {"widths": [8, 6]}, ["fc1", "fc2", "fc3"]),
        ("cnn5_k", {"k": 2}, ["layer1.0", "layer2.0", "layer3.0", "layer4.0", "fc"]),
        ("resnet18_k", {"k": 1}, ["conv1", *_resnet_blocks(), "fc"]),
    ],
)
def test_feature_layers_of_the_zoo_in_module_order(name, params, expected):
    model, shape = _zoo(name, **params)
    layers = feature_layers(model)
    assert [n for n, _ in layers] == expected
    assert [n for n, _ in feature_layers(_zoo(name, **params)[0])] == expected  # deterministic
    module_order = [n for n, _ in model.named_modules()]
    assert sorted(expected, key=module_order.index) == expected
    log = Log()
    x = torch.randn(5, *shape)
    with attach(model, [log], "train") as hooked:
        logits = model(x)
    assert hooked == expected
    assert sorted(layer for _, layer, _ in log.events) == sorted(expected)  # each once
    assert torch.equal(log.features[expected[-1]], logits.detach())  # the classifier


def test_feature_layer_patterns():
    model, _ = _zoo("resnet18_k", k=1)
    names = [n for n, _ in feature_layers(model, r"downsample$")]
    assert names == ["layer2.0.downsample", "layer3.0.downsample", "layer4.0.downsample"]
    with pytest.raises(UserInputError, match=r"'bn' matches no feature layer \(known: conv1, "):
        feature_layers(model, "bn")
    with pytest.raises(UserInputError, match="not a regular expression"):
        feature_layers(model, "[")


def test_lstm_records_its_output_sequence_not_its_state():
    torch.manual_seed(0)
    model = TinyLSTM()
    assert [n for n, _ in feature_layers(model)] == ["lstm", "head"]
    x = torch.randn(2, 5, 3)
    log = Log()
    with attach(model, [log], "eval:test"):
        model(x)
    expected, _ = model.lstm(x)
    assert torch.equal(log.features["lstm"], expected.detach())
    assert log.events == [("eval:test", "lstm", 2), ("eval:test", "head", 2)]
    packed = pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
    with attach(model.lstm, [log], "eval"):
        out, _ = model.lstm(packed)
    assert torch.equal(log.features[""], out.data)  # the packed rows (8 = 5 + 3 steps)


def test_each_recorder_gets_its_layers_and_hooks_go_away():
    model, shape = _zoo("mlp", widths=[8, 6])
    first, last = Log(layers="fc1"), Log(layers="fc3$")
    with attach(model, [first, last], "train") as hooked:
        assert hooked == ["fc1", "fc3"] and _hook_count(model) == 2
        model(torch.randn(4, *shape))
    assert [e[1] for e in first.events] == ["fc1"] and [e[1] for e in last.events] == ["fc3"]
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"), attach(model, [first], "train"):
        raise RuntimeError("boom")
    assert _hook_count(model) == 0
    with attach(model, [], "train") as hooked:
        assert hooked == [] and _hook_count(model) == 0
    with pytest.raises(UserInputError, match="phase='val'; allowed: train, eval"):
        with attach(model, [first], "val"):
            pass
    with pytest.raises(UserInputError, match="'conv' matches no feature layer"):
        with attach(model, [Log(layers="conv")], "train"):
            pass


def test_recording_changes_no_gradient():
    model, shape = _zoo("cnn5_k", k=2)
    x, y = torch.randn(6, *shape), torch.tensor([0, 1, 2, 0, 1, 2])

    def gradients(recorders):
        model.zero_grad()
        with attach(model, recorders, "train"):
            nn.functional.cross_entropy(model(x), y).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain, recorded = gradients([]), gradients([Busy(), Log()])
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded, strict=True))


# -- the training loop -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    digits = load_splits("digits", split_seed=0)
    train = Split(digits.train.x[:200], digits.train.y[:200], digits.train.sample_id[:200])
    return dataclasses.replace(digits, train=train)


CONFIG = TrainConfig(
    model="mlp",
    model_params={"widths": [8]},
    epochs=1,
    batch_size=64,
    eval_batch_size=100,
    device="cpu",
)


def _train(data, config, recorders):
    model = make_model(config, num_classes=data.num_classes, input_shape=data.input_shape)
    history = train_epochs(
        model,
        make_optimizer(model, config),
        data.train,
        config,
        eval_splits={"val": data.val, "test": data.test},
        recorders=recorders,
    )
    return model, history


def test_training_keeps_train_and_eval_forwards_apart(data):
    log = Log()
    model, _ = _train(data, CONFIG, [log])
    assert _hook_count(model) == 0
    layers = [n for n, _ in feature_layers(model)]
    assert log.events[0] == ("start", 0) and log.events[-1] == ("end", 0)
    phases = [e[0] for e in log.events[1:-1]]
    n_train = math.ceil(len(data.train.y) / CONFIG.batch_size)
    n_val = math.ceil(len(data.val.y) / CONFIG.eval_batch_size)
    n_test = math.ceil(len(data.test.y) / CONFIG.eval_batch_size)
    counts = {"train": n_train, "eval:val": n_val, "eval:test": n_test}
    # all train forwards first, then the val pass, then the test pass
    assert phases == [p for p, n in counts.items() for _ in range(n * len(layers))]
    for phase, split in (("train", data.train), ("eval:val", data.val), ("eval:test", data.test)):
        events = [e for e in log.events[1:-1] if e[0] == phase]
        for layer in layers:
            assert sum(size for _, name, size in events if name == layer) == len(split.y)


def test_recording_leaves_the_trained_weights_bit_identical(data):
    plain, plain_history = _train(data, CONFIG, [])
    recorded, history = _train(data, CONFIG, [Busy(), Log(layers="fc1")])
    assert (flatten_parameters(plain) == flatten_parameters(recorded)).all()
    assert history == plain_history


def test_evaluate_records_with_its_phase(data):
    model = make_model(CONFIG, num_classes=data.num_classes, input_shape=data.input_shape)
    log = Log(layers="fc2")
    plain = evaluate(model, data.val.x, data.val.y, 100)
    assert evaluate(model, data.val.x, data.val.y, 100, recorders=[log], phase="eval:val") == plain
    assert {e[0] for e in log.events} == {"eval:val"} and model.training
