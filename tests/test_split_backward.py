"""The split backward (I then W) gives autograd's gradients and walks the graph once."""

import pytest
import torch
from torch import nn

from brigade.stages.models import build_model
from brigade.stages.split_backward import backward_input, backward_weight


class _Shared(nn.Module):
    """One Linear used twice: its weight's branches leave the input path at two nodes."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.relu(self.lin(x)))))


def _stage(name):
    torch.manual_seed(0)
    if name == "shared":
        return _Shared(), torch.randn(5, 6)
    model = build_model(name, width=8) if name != "mlp" else build_model(name)
    blocks = list(model.children())
    k = max(1, len(blocks) // 3)
    x = nn.Sequential(*blocks[:k])(torch.randn(4, *((1, 28, 28) if name == "mlp" else (3, 32, 32))))
    return nn.Sequential(*blocks[k:]), x.detach()


@pytest.mark.parametrize("name", ["mlp", "resnet18", "revnet18", "shared"])
def test_split_equals_autograd(name):
    stage, x = _stage(name)
    x.requires_grad_(True)
    params = list(stage.parameters())
    out = stage(x)
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, [x, *params], grad_out)
    out = stage(x)
    grad_in, split = backward_input(out, grad_out, x, params)
    assert all(p.grad is None for p in params)  # I leaves weight gradients to W
    if name == "shared":
        assert stage.lin.weight in split.direct  # two branches: walked from the output
    backward_weight(split)
    torch.testing.assert_close(grad_in, expected[0], rtol=1e-5, atol=1e-6)
    for p, e in zip(params, expected[1:]):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)


def test_weight_half_does_not_walk_the_input_path_again():
    """A node between two Linear layers on the input path runs once over I and W."""
    torch.manual_seed(0)
    stage = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(3, 8, requires_grad=True)
    out = stage(x)
    calls = []
    tanh_node = out.grad_fn.next_functions[1][0]  # addmm <- tanh (the second Tanh)
    assert "Tanh" in type(tanh_node).__name__
    tanh_node.register_prehook(lambda g: calls.append(1))
    _, split = backward_input(out, torch.ones_like(out), x, list(stage.parameters()))
    assert len(calls) == 1
    assert len(split.groups) == 3 and not split.direct  # one group per Linear
    backward_weight(split)
    assert len(calls) == 1, "W walked back through the input path"
    assert all(p.grad is not None for p in stage.parameters())
