"""Built-in models: shapes, block structure, registry errors, and that any cut composes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brigade.stages.errors import ConfigError
from brigade.stages.models import build_model, model_info, model_names, shape_kwargs
from brigade.stages.partition import balance_uniform, split
from brigade.stages.resnet import Head, Stem
from brigade.stages.revnet import is_reversible

CONV_MODELS = ["resnet18", "resnet34", "resnet50", "revnet18", "revnet34", "revnet50"]
SMALL = {"width": 8, "image_size": 16}

# name -> (blocks, reversible blocks)
BLOCKS = {
    "mlp": (3, 0),
    "cnn": (6, 0),
    "resnet18": (10, 0),
    "resnet34": (18, 0),
    "resnet50": (18, 0),
    "revnet18": (10, 5),
    "revnet34": (18, 13),
    "revnet50": (18, 12),
}


def small(name: str, **kw) -> nn.Sequential:
    """A CPU-cheap variant: width 8, 12x12 (dense) or 16x16 (conv) images."""
    size = 16 if name in CONV_MODELS else 12
    return build_model(name, **{"width": 8, "image_size": size, **kw})


def test_registry_lists_every_model():
    assert model_names() == list(BLOCKS)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_counts_and_defaults(name):
    info = model_info(name)
    assert (info.blocks, info.reversible_blocks) == BLOCKS[name]
    expected = (1, 28, 28) if name in ("mlp", "cnn") else (3, 32, 32)
    assert info.input_shape == expected and info.num_classes == 10
    assert info.params > 0


def test_default_dense_models_take_mnist_images():
    x = torch.randn(2, 1, 28, 28)
    for name in ("mlp", "cnn"):
        assert build_model(name)(x).shape == (2, 10)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_dense_forward_shape(name):
    model = small(name, in_channels=3, num_classes=7)
    assert len(model) == BLOCKS[name][0]
    assert model(torch.randn(2, 3, 12, 12)).shape == (2, 7)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", CONV_MODELS)
def test_conv_forward_shape_both_stems(name, stem):
    model = small(name, stem=stem, num_classes=5)
    assert len(model) == BLOCKS[name][0]
    assert isinstance(model[0], Stem) and isinstance(model[-1], Head)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_non_square_and_single_channel_images():
    kw = shape_kwargs((1, 12, 20), 4)
    assert small("cnn", **kw)(torch.randn(2, 1, 12, 20)).shape == (2, 4)
    assert small("revnet18", **kw)(torch.randn(2, 1, 12, 20)).shape == (2, 4)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_blocks_share_no_parameters(name):
    model = small(name)
    seen: set[int] = set()
    for block in model:
        ids = {id(p) for p in block.parameters()}
        assert not ids & seen
        seen |= ids


@pytest.mark.parametrize("name", list(BLOCKS))
def test_contiguous_split_composes_to_whole_model(name):
    torch.manual_seed(0)
    model = small(name).eval()
    x = torch.randn(2, 3 if name in CONV_MODELS else 1, *(16, 16) if name in CONV_MODELS else (12, 12))
    with torch.no_grad():
        whole = model(x)
        n = len(model)
        balances = [balance_uniform(n, p) for p in range(1, n + 1)] + [[1, n - 1], [n - 1, 1]]
        for balance in balances:
            out = x
            for stage in split(model, balance):
                out = stage(out)
            torch.testing.assert_close(out, whole, rtol=1e-6, atol=1e-6)


def test_reversible_flags():
    for name in CONV_MODELS:
        model = small(name)
        flags = [is_reversible(b) for b in model]
        assert not flags[0] and not flags[-1], "stem and head are never reversible"
        assert sum(flags) == BLOCKS[name][1]
        if name.startswith("revnet"):
            assert all(hasattr(b, "reversible") for b in model)
            assert all(hasattr(b, "inverse") for b in model if is_reversible(b))


def test_names_are_case_insensitive():
    assert len(build_model("MLP", width=4)) == 3
    assert model_info("ResNet18", width=8).name == "resnet18"


@pytest.mark.parametrize(
    "name, kwargs, words",
    [
        ("resnet19", {}, ["resnet19", "resnet18", "revnet50", "mlp"]),
        ("mlp", {"stem": "cifar"}, ["stem", "in_channels", "width"]),
        ("resnet18", {"stem": "tiny"}, ["tiny", "cifar", "imagenet"]),
        ("resnet18", {"depth": 3}, ["depth", "width"]),
        ("resnet18", {"width": 0}, ["width", "0"]),
        ("cnn", {"num_classes": -1}, ["num_classes", "-1"]),
        ("cnn", {"image_size": 3}, ["4", "3"]),
        ("mlp", {"image_size": (0, 4)}, ["image_size", "(0, 4)"]),
        ("revnet18", {"width": 7}, ["even", "7", "8"]),
    ],
)
def test_bad_names_and_options_raise_config_error(name, kwargs, words):
    with pytest.raises(ConfigError) as err:
        build_model(name, **kwargs)
    for word in words:
        assert word in str(err.value)


def test_none_options_mean_default():
    assert model_info("resnet18", width=None, stem=None).width == 64


def test_models_command_lists_every_model(tmp_path, capsys):
    import json

    from brigade.engine.cli import main

    path = tmp_path / "models.json"
    assert main(["models", "--width", "8", "--data", "mnist", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    rows = {r["model"]: r for r in json.loads(path.read_text())["models"]}
    assert list(rows) == list(BLOCKS)
    for name, (blocks, reversible) in BLOCKS.items():
        assert name in out
        assert (rows[name]["blocks"], rows[name]["reversible_blocks"]) == (blocks, reversible)
        assert rows[name]["input_shape"] == [1, 28, 28] and rows[name]["width"] == 8
    assert main(["models", "--data", "svhn"]) == 2
    assert "valid: synthetic, mnist, cifar10, digits" in capsys.readouterr().err
