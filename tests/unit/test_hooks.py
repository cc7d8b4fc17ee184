"""slimtorch.hooks: temporary hooks leave nothing behind; named hooks wrap, replace and reset forwards."""

import copy

import pytest
import torch
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.hooks import ModuleHook, TemporaryHooks, attach, attached, detach, reset_state


def test_temporary_hooks_see_inputs_and_outputs_and_are_gone_even_after_an_error():
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    seen = {}
    with pytest.raises(RuntimeError, match="boom"), TemporaryHooks() as hooks:
        hooks.before(lin, lambda m, args: seen.setdefault("in", args[0]))
        hooks.after(lin, lambda m, args, out: seen.setdefault("out", out))
        y = lin(x)
        raise RuntimeError("boom")
    assert torch.equal(seen["in"], x) and torch.equal(seen["out"], y)
    assert not lin._forward_pre_hooks and not lin._forward_hooks


def test_a_pre_hook_may_replace_the_input():
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with TemporaryHooks() as hooks:
        hooks.before(lin, lambda m, args: (args[0] * 2,))
        got = lin(x)
    torch.testing.assert_close(got, lin(2 * x))


class Cache(ModuleHook):
    """Compute on the first call, then return the stored output until reset."""
    name = "cache"

    def __init__(self):
        self.stored = None
        self.computed = 0

    def new_forward(self, module, forward, *args, **kwargs):
        if self.stored is None:
            self.stored = forward(*args, **kwargs)
            self.computed += 1
        return self.stored

    def reset_state(self, module):
        self.stored = None


class Scale(ModuleHook):
    name = "scale"

    def post_forward(self, module, output):
        return output * 10


def test_a_named_hook_replaces_forward_keeps_state_and_resets():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    lin = model[0]
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    cache = attach(lin, Cache())
    first = model(a)
    assert torch.equal(model(b), first) and cache.computed == 1  # b was never computed: the cache answered
    assert reset_state(model) == 1
    torch.testing.assert_close(model(b), torch.relu(b @ lin.weight.T + lin.bias))
    assert cache.computed == 2


def test_hooks_stack_in_attach_order_and_detach_restores_the_original_forward():
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    plain = lin(x)
    attach(lin, Cache())
    attach(lin, Scale())  # wraps the cache: scales what the cache returns
    torch.testing.assert_close(lin(x), plain * 10)
    assert list(attached(lin)) == ["cache", "scale"]
    with pytest.raises(SlimError, match="already attached"):
        attach(lin, Scale())
    detach(lin, "cache")
    torch.testing.assert_close(lin(torch.zeros(1, 3)), lin.bias[None] * 10)
    detach(lin, "scale")
    assert "forward" not in lin.__dict__ and not attached(lin)
    torch.testing.assert_close(lin(x), plain)
    with pytest.raises(SlimError, match="no hook named"):
        detach(lin, "scale")


def test_a_hooked_module_deep_copies_with_its_own_hook():
    lin = nn.Linear(3, 2)
    attach(lin, Scale())
    twin = copy.deepcopy(lin)
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.fill_(1.0)
    torch.testing.assert_close(twin(torch.randn(2, 3)), torch.full((2, 2), 10.0))
    assert attached(twin)["scale"] is not attached(lin)["scale"]


class Replace(ModuleHook):
    """Computes the output itself (never calls the wrapped forward): 2 x + 1 of the input's first column."""
    name = "replace"
    replaces_forward = True

    def new_forward(self, module, forward, x):
        return 2 * x[:, :1] + 1


class Shift(ModuleHook):
    """Observes and edits the input: adds 1 before the computation."""
    name = "shift"

    def pre_forward(self, module, args, kwargs):
        return (args[0] + 1,), kwargs


def test_a_replacing_hook_sits_innermost_whatever_the_attach_order():
    x = torch.randn(4, 3)
    want = 2 * (x[:, :1] + 1) + 1  # the shift must reach the replacing computation
    for order in ((Shift, Replace), (Replace, Shift)):
        lin = nn.Linear(3, 2)
        for cls in order:
            attach(lin, cls())
        torch.testing.assert_close(lin(x), want)
        with pytest.raises(SlimError, match="already does"):
            attach(lin, type("Other", (Replace,), {"name": "other"})())
